//! Atomic file replacement for files the station depends on (model, calibration, weights):
//! a reader sees the old file or the new one, never half of one, even across a power cut.
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to a uniquely named temporary file beside `path`, syncs it, renames it over
/// `path`, then syncs the folder so the rename itself survives a power cut.
///
/// The temporary name starts with `.`, so folder scans skip it; it is removed on any failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid("path", format!("{} has no file name", path.display())))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        // tempfile's default is 0600; the file gets what `File::create` would give (umask
        // applies), so a station running as another user can still read a model or calibration.
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(|e| Error::io(path, e))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/model.bin");
        write_atomic(&path, b"first version").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn unwritable_target_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").unwrap();
        let err = write_atomic(&blocker.join("model.bin"), b"y").unwrap_err();
        assert!(err.to_string().contains("file"), "{err}");
    }

    #[test]
    fn failed_rename_names_the_path_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty folder where the file should go: the rename over it fails.
        let target = dir.path().join("model.bin");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), b"x").unwrap();
        let err = write_atomic(&target, b"y").unwrap_err();
        assert!(err.to_string().contains("model.bin"), "{err}");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn file_mode_is_what_file_create_gives() {
        let dir = tempfile::tempdir().unwrap();
        let reference = dir.path().join("reference");
        std::fs::File::create(&reference).unwrap();
        let path = dir.path().join("calibration.json");
        write_atomic(&path, b"{}").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&reference));
    }

    #[test]
    fn concurrent_writers_never_tear_the_file_nor_leave_temps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.bin");
        // Distinct lengths and contents: a torn or interleaved file matches neither.
        let a = vec![b'a'; 256 * 1024];
        let b = vec![b'b'; 300 * 1024];
        write_atomic(&path, &a).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let seen = std::fs::read(&path).unwrap();
                    assert!(seen == a || seen == b, "torn file of {} bytes", seen.len());
                }
            });
            let path = &path;
            let writers: Vec<_> = [&a, &b]
                .into_iter()
                .map(|bytes| s.spawn(move || (0..20).try_for_each(|_| write_atomic(path, bytes))))
                .collect();
            // Joined before any assertion, so a failed writer fails the test, never hangs it.
            let results = writers.into_iter().map(|w| w.join().unwrap()).collect();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            reader.join().unwrap();
            results
        });
        for r in results {
            r.unwrap();
        }
        let seen = std::fs::read(&path).unwrap();
        assert!(seen == a || seen == b);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("model.bin")]);
    }
}
