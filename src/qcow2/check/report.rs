//! The result of a check, in `qemu-img check`'s terms: its JSON field names, its human
//! summary and its exit codes.
//!
//! Every problem the check meets reaches both the summary and the exit code, as in
//! `qemu-img check`: corruptions (2), leaks (3), and internal errors — a structure that could
//! not be read, so the check is incomplete — which make the verdict 1 whatever else was found:
//! a check that missed part of the image must not say the image is clean.

use serde::Serialize;

/// The result, with `qemu-img check --output=json` field names.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub filename: String,
    pub format: &'static str,
    pub check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// One line per problem found, QEMU's wording where it has one.
    #[serde(skip)]
    pub messages: Vec<String>,
    /// The corruptions that only concern refcounts or COPIED flags (included in
    /// `corruptions`): what rebuilding the refcounts from the mapping repairs, as QEMU does on
    /// opening an image with the dirty bit set.
    #[serde(skip)]
    pub refcount_corruptions: u64,
    /// Faults no refcount repair fixes and every repair would build on (included in
    /// `corruptions`): in what maps guest data, or in a structure the reader refuses. A repair
    /// writes nothing while there are any (see [`CheckReport::unrepairable_reason`]).
    #[serde(skip)]
    pub unrepairable: u64,
    /// The first of them, for the refusal's message.
    #[serde(skip)]
    pub first_unrepairable: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl CheckReport {
    /// `qemu-img check`'s human summary.
    pub fn human(&self) -> String {
        let r = self;
        let mut s = String::new();
        if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        }
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
        if r.leaks_fixed + r.corruptions_fixed > 0 {
            s.push_str(&format!(
                "Repaired: {} leaked clusters, {} corruptions.\n",
                r.leaks_fixed, r.corruptions_fixed
            ));
        }
        let pct = |n: u64| 100.0 * n as f64 / r.total_clusters.max(1) as f64;
        let pct_of = |n: u64| 100.0 * n as f64 / r.allocated_clusters.max(1) as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\nImage end offset: {}\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters),
            pct_of(r.fragmented_clusters),
            pct_of(r.compressed_clusters),
            r.image_end_offset
        ));
        s
    }

    /// `qemu-img check`'s exit code: 1 when the check could not read everything (it may have
    /// missed problems), else 0 clean, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// Why a repair must not write, if it must not: part of the image could not be read, or
    /// a fault a refcount repair would build on.
    pub fn unrepairable_reason(&self) -> Option<String> {
        if self.check_errors > 0 {
            return Some(format!(
                "{} structure(s) could not be read, so the check is incomplete",
                self.check_errors
            ));
        }
        let first = self.first_unrepairable.as_ref()?;
        Some(match self.unrepairable {
            0 | 1 => first.clone(),
            n => format!("{first} (and {} more such faults)", n - 1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An internal error (a structure that could not be read) reaches the summary and the
    /// exit code, as in qemu-img: 1 whatever else was found, never "No errors".
    #[test]
    fn internal_errors_reach_summary_and_exit_code() {
        let mut r = CheckReport {
            check_errors: 1,
            total_clusters: 16,
            ..Default::default()
        };
        assert_eq!(r.exit_code(), 1);
        let human = r.human();
        assert!(!human.contains("No errors"), "{human}");
        assert!(human.contains("\n1 internal errors have occurred during the check.\n"));
        assert!(r.unrepairable_reason().is_some());
        r.corruptions = 3;
        assert_eq!(r.exit_code(), 1);
        assert!(r.human().contains("\n3 errors were found on the image.\n"));
        r.check_errors = 0;
        assert_eq!(r.exit_code(), 2);
        assert_eq!(r.unrepairable_reason(), None);
        r.unrepairable = 2;
        r.first_unrepairable = Some("L2 table at 0x30000 overlaps".into());
        assert_eq!(
            r.unrepairable_reason().as_deref(),
            Some("L2 table at 0x30000 overlaps (and 1 more such faults)")
        );
    }
}
