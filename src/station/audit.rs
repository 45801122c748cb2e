//! The audit folder: each rejected part as `<stamp>-<id>.png` (the image the model saw),
//! `<stamp>-<id>-heatmap.png` (overlay) and `<stamp>-<id>.json` (its result line). The folder is
//! bounded in parts and bytes; the oldest part goes first. Names start with the capture time, so
//! the order survives restarts.
use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use super::Decided;
use crate::error::{Error, Result};

pub struct Audit {
    dir: PathBuf,
    max_parts: usize,
    max_bytes: u64,
    map_range: (f32, f32),
    /// Stored parts, oldest first: (name prefix, bytes).
    parts: VecDeque<(String, u64)>,
    bytes: u64,
}

fn prefix_of(file_name: &str) -> Option<&str> {
    let stem = file_name
        .strip_suffix("-heatmap.png")
        .or_else(|| file_name.strip_suffix(".png"))
        .or_else(|| file_name.strip_suffix(".json"))?;
    // `<stamp>-<id>`: a stamp like 20261123T010203.456Z.
    stem.contains('T').then_some(stem)
}

impl Audit {
    /// Opens (creating) the folder and takes stock of what earlier runs left there.
    pub fn open(
        dir: &Path,
        max_parts: usize,
        max_bytes: u64,
        map_range: (f32, f32),
    ) -> Result<Audit> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut found: std::collections::BTreeMap<String, u64> = Default::default();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(prefix) = prefix_of(&name) {
                let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
                *found.entry(prefix.to_string()).or_default() += len;
            }
        }
        let bytes = found.values().sum();
        let mut audit = Audit {
            dir: dir.to_path_buf(),
            max_parts,
            max_bytes,
            map_range,
            parts: found.into_iter().collect(),
            bytes,
        };
        audit.prune();
        Ok(audit)
    }

    fn remove_oldest(&mut self) {
        if let Some((prefix, len)) = self.parts.pop_front() {
            for suffix in [".png", "-heatmap.png", ".json"] {
                let _ = std::fs::remove_file(self.dir.join(format!("{prefix}{suffix}")));
            }
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

    /// Stores one rejected part; `json` is its result line.
    pub fn store(&mut self, part: &Decided, json: &str) -> Result<()> {
        let stamp =
            chrono::DateTime::<chrono::Utc>::from(part.captured_wall).format("%Y%m%dT%H%M%S%.3fZ");
        let prefix = format!("{stamp}-{:08}", part.id);
        let mut written = Vec::with_capacity(3);
        let json_path = self.dir.join(format!("{prefix}.json"));
        std::fs::write(&json_path, format!("{json}\n")).map_err(|e| Error::io(&json_path, e))?;
        written.push(json_path);
        if let Some((image, map)) = &part.evidence {
            let image_path = self.dir.join(format!("{prefix}.png"));
            crate::data::image::save_png(image, &image_path)?;
            written.push(image_path);
            let overlay = self.dir.join(format!("{prefix}-heatmap.png"));
            crate::report::heatmap_overlay(image, map, self.map_range, None, &overlay)?;
            written.push(overlay);
        }
        let bytes = written
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        self.parts.push_back((prefix, bytes));
        self.bytes += bytes;
        self.prune();
        Ok(())
    }
}
