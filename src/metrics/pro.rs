//! AUPRO, the per-region overlap metric of MVTec AD (Bergmann et al., IJCV 2021).
use super::ranking::{for_each_group, key};

/// Normalised area under the PRO curve for false positive rates in `[0, fpr_limit]`.
///
/// The ground truth's defect regions are its 8-connected components, per image. At each
/// threshold, PRO is the mean over all regions of all images of the fraction of the region scoring
/// `>= threshold`, and FPR is the fraction of all defect-free pixels scoring `>= threshold`. The
/// curve is integrated with the trapezoidal rule, linearly interpolated at `fpr_limit`, and
/// divided by `fpr_limit`, so a perfect map scores 1.
///
/// `None` when a map or mask is not `height * width` long, the counts of maps and masks differ,
/// `fpr_limit` is not in `(0, 1]`, or there is no defect region or no defect-free pixel.
pub fn aupro(
    maps: &[&[f32]],
    masks: &[&[u8]],
    height: usize,
    width: usize,
    fpr_limit: f64,
) -> Option<f64> {
    let pixels = height * width;
    let shapes_ok = maps.len() == masks.len()
        && maps.iter().all(|m| m.len() == pixels)
        && masks.iter().all(|m| m.len() == pixels);
    if !(shapes_ok && fpr_limit > 0.0 && fpr_limit <= 1.0) {
        return None;
    }

    // Payload 0 = defect-free pixel, r >= 1 = region r (numbered across all images).
    let mut keys = Vec::with_capacity(maps.len() * pixels);
    let mut region_sizes = vec![0u64]; // index 0 unused
    let mut labeller = Labeller::new(height, width);
    for (map, mask) in maps.iter().zip(masks) {
        let first_region = region_sizes.len() as u32;
        labeller.label(mask, first_region, &mut region_sizes);
        keys.extend(map.iter().zip(&labeller.labels).map(|(&s, &r)| key(s, r)));
    }
    let regions = region_sizes.len() - 1;
    let defect_free = keys.iter().filter(|&&k| k as u32 == 0).count();
    if regions == 0 || defect_free == 0 {
        return None;
    }
    keys.sort_unstable();

    let share: Vec<f64> = region_sizes
        .iter()
        .map(|&size| if size == 0 { 0.0 } else { 1.0 / size as f64 })
        .collect();
    let mut curve = Integral::new(fpr_limit);
    let mut false_positives = 0usize;
    // Sum over regions of their covered fraction.
    let mut covered = 0.0f64;
    for_each_group(&keys, |_, group| {
        if curve.done {
            return;
        }
        for &k in group {
            match k as u32 {
                0 => false_positives += 1,
                region => covered += share[region as usize],
            }
        }
        let fpr = false_positives as f64 / defect_free as f64;
        curve.push(fpr, (covered / regions as f64).min(1.0));
    });
    Some(curve.area / fpr_limit)
}

/// Trapezoidal area under a curve given point by point with non-decreasing x, from (0, 0) up to
/// x = `limit` (interpolated there).
struct Integral {
    limit: f64,
    last: (f64, f64),
    area: f64,
    done: bool,
}

impl Integral {
    fn new(limit: f64) -> Self {
        Integral {
            limit,
            last: (0.0, 0.0),
            area: 0.0,
            done: false,
        }
    }

    fn push(&mut self, x: f64, y: f64) {
        let (x0, y0) = self.last;
        if x <= self.limit {
            self.area += (x - x0) * (y + y0) / 2.0;
            self.last = (x, y);
        } else {
            let y_at_limit = y0 + (y - y0) * (self.limit - x0) / (x - x0);
            self.area += (self.limit - x0) * (y0 + y_at_limit) / 2.0;
            self.done = true;
        }
    }
}

/// 8-connected component labelling of one mask at a time, reusing its buffers.
struct Labeller {
    height: usize,
    width: usize,
    labels: Vec<u32>,
    stack: Vec<usize>,
}

impl Labeller {
    fn new(height: usize, width: usize) -> Self {
        Labeller {
            height,
            width,
            labels: vec![0; height * width],
            stack: Vec::new(),
        }
    }

    /// Fills `labels` with 0 for mask value 0 and consecutive ids from `first_region` for the
    /// components, appending each component's size to `sizes`.
    fn label(&mut self, mask: &[u8], first_region: u32, sizes: &mut Vec<u64>) {
        self.labels.fill(0);
        let mut next = first_region;
        for start in 0..mask.len() {
            if mask[start] == 0 || self.labels[start] != 0 {
                continue;
            }
            self.labels[start] = next;
            self.stack.push(start);
            let mut size = 0u64;
            while let Some(p) = self.stack.pop() {
                size += 1;
                let (y, x) = (p / self.width, p % self.width);
                for ny in y.saturating_sub(1)..=(y + 1).min(self.height - 1) {
                    for nx in x.saturating_sub(1)..=(x + 1).min(self.width - 1) {
                        let q = ny * self.width + nx;
                        if mask[q] != 0 && self.labels[q] == 0 {
                            self.labels[q] = next;
                            self.stack.push(q);
                        }
                    }
                }
            }
            sizes.push(size);
            next += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_eight_connected() {
        // Two diagonal touches join; the right column is separate.
        #[rustfmt::skip]
        let mask = [
            1, 0, 0, 1,
            0, 1, 0, 1,
            0, 0, 0, 0,
            1, 1, 0, 0,
        ];
        let mut labeller = Labeller::new(4, 4);
        let mut sizes = vec![0];
        labeller.label(&mask, 1, &mut sizes);
        assert_eq!(sizes, vec![0, 2, 2, 2]);
        #[rustfmt::skip]
        let expected = [
            1, 0, 0, 2,
            0, 1, 0, 2,
            0, 0, 0, 0,
            3, 3, 0, 0,
        ];
        assert_eq!(labeller.labels, expected);
    }
}
