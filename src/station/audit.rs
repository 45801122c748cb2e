//! The audit folder: each rejected part as `<stamp>-<id>.png` (the image the model saw),
//! `<stamp>-<id>-heatmap.png` (overlay) and `<stamp>-<id>.json` (its result line). The folder is
//! bounded in parts and bytes; the oldest part goes first. Names start with the capture time, so
//! the order survives restarts. It never fills its partition: below `min_free_bytes` of free
//! space it gives up its own oldest parts, then skips new ones.
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use super::Decided;
use crate::error::{Error, Result};

pub struct Audit {
    dir: PathBuf,
    max_parts: usize,
    max_bytes: u64,
    min_free_bytes: u64,
    /// Stored parts, oldest first: (name prefix, bytes).
    parts: VecDeque<(String, u64)>,
    bytes: u64,
    capacity_warning: Option<String>,
}

/// What [`Audit::store`] did with a part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored {
    Kept,
    /// Not kept, and why (the limit named by its key); nothing of it is left on disk.
    Skipped(String),
}

const SUFFIXES: [&str; 3] = [".json", ".png", "-heatmap.png"];

fn prefix_of(file_name: &str) -> Option<&str> {
    let stem = file_name
        .strip_suffix("-heatmap.png")
        .or_else(|| file_name.strip_suffix(".png"))
        .or_else(|| file_name.strip_suffix(".json"))?;
    // `<stamp>-<id>`: a stamp like 20261123T010203.456Z.
    stem.contains('T').then_some(stem)
}

/// Bytes available to an unprivileged writer on the file system holding `dir`; None when it
/// cannot be asked (no such folder).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data, so all-zero is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` a valid, writable statvfs for the call.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    // Both are u64 on 64-bit Linux and narrower on some 32-bit targets.
    (rc == 0).then(|| (st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// The parts in `dir` by name prefix (oldest first, as names start with the time) and their bytes.
fn take_stock(dir: &Path) -> Result<VecDeque<(String, u64)>> {
    let mut found: BTreeMap<String, u64> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(prefix) = prefix_of(&name) {
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            *found.entry(prefix.to_string()).or_default() += len;
        }
    }
    Ok(found.into_iter().collect())
}

impl Audit {
    /// Opens (creating) the folder and takes stock of what earlier runs left there.
    /// `part_bytes_estimate` is the caller's estimate of one stored part, to warn at start when
    /// the limits can hold none.
    pub fn open(
        dir: &Path,
        max_parts: usize,
        max_bytes: u64,
        min_free_bytes: u64,
        part_bytes_estimate: u64,
    ) -> Result<Audit> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let parts = take_stock(dir)?;
        let mut warnings = Vec::new();
        if max_bytes < part_bytes_estimate {
            warnings.push(format!(
                "audit.max_bytes {max_bytes} holds no part (one takes about \
                 {part_bytes_estimate} bytes): rejected parts will not be kept"
            ));
        }
        if let Some(free) = free_bytes(dir).filter(|&f| f < min_free_bytes) {
            warnings.push(format!(
                "free space {free} bytes on {} is below audit.min_free_bytes {min_free_bytes}: \
                 the oldest audited parts will be removed and new ones not kept while it stays so",
                dir.display()
            ));
        }
        let capacity_warning = (!warnings.is_empty()).then(|| warnings.join("; "));
        if let Some(w) = &capacity_warning {
            log::warn!("{w}");
        }
        let mut audit = Audit {
            dir: dir.to_path_buf(),
            max_parts,
            max_bytes,
            min_free_bytes,
            bytes: parts.iter().map(|p| p.1).sum(),
            parts,
            capacity_warning,
        };
        audit.prune();
        Ok(audit)
    }

    /// Why the limits given at open can keep no part, if they cannot.
    pub fn capacity_warning(&self) -> Option<&str> {
        self.capacity_warning.as_deref()
    }

    fn remove_files(&self, prefix: &str) {
        for suffix in SUFFIXES {
            // Missing files are fine: a part without evidence has only its JSON.
            let _ = std::fs::remove_file(self.dir.join(format!("{prefix}{suffix}")));
        }
    }

    fn remove_oldest(&mut self) {
        if let Some((prefix, len)) = self.parts.pop_front() {
            self.remove_files(&prefix);
            self.bytes = self.bytes.saturating_sub(len);
        }
    }

    fn prune(&mut self) {
        while self.parts.len() > self.max_parts
            || (self.bytes > self.max_bytes && !self.parts.is_empty())
        {
            self.remove_oldest();
        }
    }

    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Recreates the folder when it was deleted under the running station, forgetting the parts
    /// that went with it.
    fn ensure_dir(&mut self) -> Result<()> {
        if self.dir.is_dir() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        self.parts = take_stock(&self.dir)?;
        self.bytes = self.parts.iter().map(|p| p.1).sum();
        log::warn!("audit folder {} was gone: recreated", self.dir.display());
        Ok(())
    }

    /// Makes room down to `min_free_bytes` with the folder's own oldest parts; the free space
    /// still short of it, if it stays short.
    fn free_space_shortfall(&mut self) -> Option<u64> {
        loop {
            // A file system that cannot be asked is written to; a write error then says why.
            let free = free_bytes(&self.dir)?;
            if free >= self.min_free_bytes {
                return None;
            }
            if self.parts.is_empty() {
                return Some(free);
            }
            self.remove_oldest();
        }
    }

    /// Stores one rejected part; `json` is its result line. A write error removes what was
    /// written of the part and names the file.
    pub fn store(&mut self, part: &Decided, json: &str) -> Result<Stored> {
        self.ensure_dir()?;
        if let Some(free) = self.free_space_shortfall() {
            return Ok(Stored::Skipped(format!(
                "free space {free} bytes below audit.min_free_bytes {}",
                self.min_free_bytes
            )));
        }
        let stamp =
            chrono::DateTime::<chrono::Utc>::from(part.captured_wall).format("%Y%m%dT%H%M%S%.3fZ");
        let prefix = format!("{stamp}-{:08}", part.id);
        if let Err(e) = self.write_part(&prefix, part, json) {
            self.remove_files(&prefix);
            return Err(e);
        }
        let bytes = SUFFIXES
            .iter()
            .filter_map(|s| std::fs::metadata(self.dir.join(format!("{prefix}{s}"))).ok())
            .map(|m| m.len())
            .sum();
        // Kept, it would evict every other part and then itself.
        if bytes > self.max_bytes {
            self.remove_files(&prefix);
            return Ok(Stored::Skipped(format!(
                "part of {bytes} bytes exceeds audit.max_bytes {}",
                self.max_bytes
            )));
        }
        self.parts.push_back((prefix, bytes));
        self.bytes += bytes;
        self.prune();
        Ok(Stored::Kept)
    }

    fn write_part(&self, prefix: &str, part: &Decided, json: &str) -> Result<()> {
        let json_path = self.dir.join(format!("{prefix}.json"));
        std::fs::write(&json_path, format!("{json}\n")).map_err(|e| Error::io(&json_path, e))?;
        if let Some((image, map, range)) = &part.evidence {
            crate::data::image::save_png(image, &self.dir.join(format!("{prefix}.png")))?;
            let overlay = self.dir.join(format!("{prefix}-heatmap.png"));
            crate::report::heatmap_overlay(image, map, *range, None, &overlay)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Image;
    use crate::station::Verdict;

    fn rejected(id: u64) -> Decided {
        let mut image = Image::zeros(1, 8, 8);
        for (i, v) in image.data.iter_mut().enumerate() {
            *v = i as f32 / 64.0;
        }
        let map = (0..64).map(|i| i as f32 / 64.0).collect();
        Decided {
            normalized: Some(0.75),
            evidence: Some((image, map, (0.0, 1.0))),
            ..Decided::for_test(id, Verdict::Ng, Some(0.9), None)
        }
    }

    fn open(dir: &Path, max_bytes: u64, min_free_bytes: u64) -> Audit {
        Audit::open(dir, 10, max_bytes, min_free_bytes, 64 + 3 * 64).unwrap()
    }

    fn files(dir: &Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |d| d.count())
    }

    #[test]
    fn a_deleted_folder_is_recreated_and_the_part_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("audit");
        let mut audit = open(&dir, 1 << 30, 0);
        assert_eq!(audit.capacity_warning(), None);
        assert_eq!(audit.store(&rejected(1), "{}").unwrap(), Stored::Kept);
        assert_eq!((audit.parts(), files(&dir)), (1, 3));

        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(audit.store(&rejected(2), "{}").unwrap(), Stored::Kept);
        // The first part went with the folder and is forgotten.
        assert_eq!((audit.parts(), files(&dir)), (1, 3));
        assert_eq!(audit.bytes(), take_stock(&dir).unwrap()[0].1);
    }

    #[test]
    fn too_little_free_space_skips_the_part_naming_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(free_bytes(tmp.path()).is_some_and(|f| f > 0));
        let mut audit = open(tmp.path(), 1 << 30, u64::MAX >> 1);
        let warning = audit.capacity_warning().unwrap().to_string();
        assert!(warning.contains("audit.min_free_bytes"), "{warning}");
        match audit.store(&rejected(1), "{}").unwrap() {
            Stored::Skipped(why) => assert!(
                why.contains("below audit.min_free_bytes 9223372036854775807"),
                "{why}"
            ),
            Stored::Kept => panic!("kept with no free space"),
        }
        assert_eq!((audit.parts(), files(tmp.path())), (0, 0));

        // Parts kept while there was room are given up first, then the new one is skipped.
        let mut audit = open(tmp.path(), 1 << 30, 0);
        for id in [1, 2] {
            assert_eq!(audit.store(&rejected(id), "{}").unwrap(), Stored::Kept);
        }
        assert_eq!(files(tmp.path()), 6);
        audit.min_free_bytes = u64::MAX >> 1;
        assert!(matches!(
            audit.store(&rejected(3), "{}").unwrap(),
            Stored::Skipped(_)
        ));
        assert_eq!((audit.parts(), audit.bytes(), files(tmp.path())), (0, 0, 0));
    }

    #[test]
    fn a_max_bytes_below_one_part_warns_and_skips() {
        let tmp = tempfile::tempdir().unwrap();
        let mut audit = open(tmp.path(), 100, 0);
        let warning = audit.capacity_warning().unwrap();
        assert!(
            warning.contains("audit.max_bytes 100 holds no part (one takes about 256 bytes)"),
            "{warning}"
        );
        match audit.store(&rejected(1), "{}").unwrap() {
            Stored::Skipped(why) => assert!(why.contains("exceeds audit.max_bytes 100"), "{why}"),
            Stored::Kept => panic!("kept above max_bytes"),
        }
        assert_eq!((audit.parts(), audit.bytes(), files(tmp.path())), (0, 0, 0));
    }

    #[test]
    fn a_write_error_is_an_error_naming_the_file_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("audit");
        let mut audit = open(&dir, 1 << 30, 0);
        // Root ignores permission bits: make the folder a regular file so that recreating it fails.
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, b"").unwrap();
        let err = audit.store(&rejected(1), "{}").unwrap_err().to_string();
        assert!(err.contains(&dir.display().to_string()), "{err}");

        // A file that cannot be written: /dev/full as the image file of a part, through a link.
        let dir = tmp.path().join("full");
        let mut audit = open(&dir, 1 << 30, 0);
        let part = rejected(2);
        let stamp =
            chrono::DateTime::<chrono::Utc>::from(part.captured_wall).format("%Y%m%dT%H%M%S%.3fZ");
        let image = dir.join(format!("{stamp}-00000002.png"));
        std::os::unix::fs::symlink("/dev/full", &image).unwrap();
        let err = audit.store(&part, "{}").unwrap_err().to_string();
        assert!(err.contains(&image.display().to_string()), "{err}");
        // The JSON written before it is gone again, and so is the link.
        assert_eq!((audit.parts(), files(&dir)), (0, 0));
    }
}
