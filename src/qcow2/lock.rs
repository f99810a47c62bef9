//! QEMU's image locking, so we never write an image a running QEMU uses, and QEMU cannot open
//! one we are writing.
//!
//! QEMU (since 2.10) takes open-file-description byte-range locks on every image it opens:
//! for each permission it holds a shared lock on byte `100 + n`, and for each permission it
//! does not let others have, a shared lock on byte `200 + n` (n: 0 consistent read, 1 write,
//! 2 write-unchanged, 3 resize, 4 graph-mod). A guest disk opened read-write therefore holds
//! byte 101 ("write") and 201 (writing is not shared). We test those bytes the same way QEMU
//! does, and while modifying an image hold the same locks QEMU would, so that a QEMU started
//! meanwhile fails with "Failed to get "write" lock" instead of reading a half-written image.

use super::error::ErrorKind;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Mutex;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;

fn lock_cmd(
    file: &File,
    cmd: libc::c_int,
    kind: libc::c_int,
    byte: i64,
) -> io::Result<libc::flock> {
    // SAFETY: a zeroed flock is a valid argument; fcntl only reads/writes the struct we own.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl)
}

/// Whether another process holds a lock that conflicts with `kind` on `byte`.
fn taken(file: &File, kind: libc::c_int, byte: i64) -> io::Result<bool> {
    let fl = lock_cmd(file, libc::F_OFD_GETLK, kind, byte)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Whether a process (a running QEMU) has the image open with write permission.
pub fn has_writer(file: &File) -> io::Result<bool> {
    taken(file, libc::F_WRLCK, PERM_BASE + WRITE)
}

/// Takes QEMU's locks for exclusive writing on `file`, held until it is closed: write and
/// resize permissions, and nobody else may write or resize. Fails with a clear message when
/// a QEMU (or another writer) uses the image.
pub fn lock_for_write(file: &File) -> Result<(), String> {
    let busy = |what: &str| {
        format!("the image is in use ({what}): a running QEMU may have it open; stop the VM or work on a copy")
    };
    // A lock can be held for a moment by a process that was just forked from one holding it
    // (until it execs); a QEMU holds it for good. Look a few times before refusing.
    let mut attempts = 0;
    loop {
        let conflict = if has_writer(file).map_err(|e| e.to_string())? {
            Some("another process holds write permission")
        } else if taken(file, libc::F_WRLCK, SHARED_BASE + WRITE).map_err(|e| e.to_string())? {
            Some("another process does not share write permission")
        } else {
            None
        };
        match conflict {
            None => break,
            Some(why) if attempts == 10 => return Err(busy(why)),
            Some(_) => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
    for byte in [
        PERM_BASE + WRITE,
        PERM_BASE + RESIZE,
        SHARED_BASE + WRITE,
        SHARED_BASE + RESIZE,
    ] {
        lock_cmd(file, libc::F_OFD_SETLK, libc::F_RDLCK, byte).map_err(|e| busy(&e.to_string()))?;
    }
    Ok(())
}

/// Files (device, inode) this process holds QEMU's write locks on. A lock probe cannot tell
/// whose lock it sees (open-file-description locks report no process), so this is how a read
/// of an image this very process is writing (commit relinking an INC onto the FULL it folds
/// into) knows the writer is not a running QEMU.
static OURS: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

fn ours() -> std::sync::MutexGuard<'static, Vec<(u64, u64)>> {
    OURS.lock().unwrap_or_else(|e| e.into_inner())
}

fn id_of(file: &File) -> io::Result<(u64, u64)> {
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// Whether this process holds the write locks on `file` (through another descriptor).
fn held_here(file: &File) -> bool {
    id_of(file).is_ok_and(|id| ours().contains(&id))
}

/// This process's registration of a file it holds write locks on, for as long as the file is
/// open: keep it beside the file and drop it with it.
#[must_use = "the registration ends when this is dropped"]
pub struct Ours((u64, u64));

impl Drop for Ours {
    fn drop(&mut self) {
        let mut v = ours();
        if let Some(i) = v.iter().position(|&x| x == self.0) {
            v.swap_remove(i);
        }
    }
}

/// Opens `path` read-write with QEMU's write locks held (see [`lock_for_write`]) until the
/// file is closed.
pub fn open_for_write(path: &Path) -> Result<(File, Ours), ErrorKind> {
    if !super::protocol::is_local(path) {
        return Err(ErrorKind::Unsupported(
            "images are changed in place only in local files (an object store cannot); work on a local copy".into(),
        ));
    }
    let file = File::options().read(true).write(true).open(path)?;
    lock_for_write(&file).map_err(ErrorKind::InUse)?;
    let id = id_of(&file)?;
    ours().push(id);
    Ok((file, Ours(id)))
}

/// Warns when a running QEMU writes the image we are about to read: what we read may change
/// underneath (reading it is still allowed, as `qemu-img -U` allows it). An image this
/// process itself is writing is no surprise and gets no warning.
pub fn warn_if_written(file: &File, path: &Path) {
    if held_here(file) {
        return;
    }
    if has_writer(file).unwrap_or(false) {
        tracing::warn!(
            "{}: in use by a running QEMU (it holds the write lock): its contents may change while being read",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_write_locks_are_seen_by_other_descriptions() {
        let t = tempfile::NamedTempFile::new().unwrap();
        let a = File::options()
            .read(true)
            .write(true)
            .open(t.path())
            .unwrap();
        let b = File::options()
            .read(true)
            .write(true)
            .open(t.path())
            .unwrap();
        assert!(!has_writer(&b).unwrap());
        lock_for_write(&a).unwrap();
        assert!(has_writer(&b).unwrap());
        assert!(lock_for_write(&b).unwrap_err().contains("in use"));
        drop(a);
        lock_for_write(&b).unwrap();
    }

    #[test]
    fn our_own_write_locks_are_known_as_ours() {
        let t = tempfile::NamedTempFile::new().unwrap();
        let reader = File::open(t.path()).unwrap();
        assert!(!held_here(&reader));
        let (file, mine) = open_for_write(t.path()).unwrap();
        assert!(held_here(&reader) && has_writer(&reader).unwrap());
        drop(mine);
        drop(file);
        assert!(!held_here(&reader) && !has_writer(&reader).unwrap());
    }
}
