//! The result of a check, in `qemu-img check`'s terms: its JSON field names, its human
//! summary and its exit codes.

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
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl CheckReport {
    /// `qemu-img check`'s human summary.
    pub fn human(&self) -> String {
        let r = self;
        let mut s = String::new();
        if r.corruptions == 0 && r.leaks == 0 {
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

    /// `qemu-img check`'s exit code: 0 clean, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> u8 {
        if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}
