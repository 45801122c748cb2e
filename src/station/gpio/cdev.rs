//! The Linux GPIO character device (`/dev/gpiochipN`), uAPI v2, through hand-written ioctls.
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;

use super::{Encoder, GpioOutputs, OutputLine};
use crate::error::{Error, Result};

const LINES_MAX: usize = 64;
const NAME_SIZE: usize = 32;
const NUM_ATTRS_MAX: usize = 10;

const FLAG_INPUT: u64 = 1 << 2;
const FLAG_OUTPUT: u64 = 1 << 3;
const FLAG_EDGE_RISING: u64 = 1 << 4;
const FLAG_EDGE_FALLING: u64 = 1 << 5;

#[repr(C)]
#[derive(Clone, Copy)]
struct LineAttribute {
    id: u32,
    padding: u32,
    value: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct LineConfigAttribute {
    attr: LineAttribute,
    mask: u64,
}

#[repr(C)]
struct LineConfig {
    flags: u64,
    num_attrs: u32,
    padding: [u32; 5],
    attrs: [LineConfigAttribute; NUM_ATTRS_MAX],
}

#[repr(C)]
struct LineRequest {
    offsets: [u32; LINES_MAX],
    consumer: [u8; NAME_SIZE],
    config: LineConfig,
    num_lines: u32,
    event_buffer_size: u32,
    padding: [u32; 5],
    fd: i32,
}

#[repr(C)]
struct LineValues {
    bits: u64,
    mask: u64,
}

/// `struct gpio_v2_line_event`: 48 bytes.
const EVENT_SIZE: usize = 48;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xB4 << 8) | nr
}
const GET_LINE: u64 = iowr(0x07, std::mem::size_of::<LineRequest>());
const SET_VALUES: u64 = iowr(0x0F, std::mem::size_of::<LineValues>());

fn gpio_error(chip: &Path, what: &str) -> Error {
    Error::Device(format!(
        "GPIO {}: {what}: {}",
        chip.display(),
        std::io::Error::last_os_error()
    ))
}

/// Requests `offsets` of `chip` with `flags`; the returned descriptor owns the lines.
fn request(chip: &Path, offsets: &[u32], flags: u64) -> Result<OwnedFd> {
    let chip_file = File::open(chip).map_err(|e| Error::io(chip, e))?;
    // SAFETY: all-zero is a valid value of this plain C struct.
    let mut req: LineRequest = unsafe { std::mem::zeroed() };
    req.offsets[..offsets.len()].copy_from_slice(offsets);
    req.consumer[..5].copy_from_slice(b"vigil");
    req.config.flags = flags;
    req.num_lines = offsets.len() as u32;
    // SAFETY: GET_LINE takes a pointer to a gpio_v2_line_request, which LineRequest mirrors.
    let rc = unsafe {
        libc::ioctl(
            chip_file.as_raw_fd(),
            GET_LINE as _,
            &mut req as *mut LineRequest,
        )
    };
    if rc < 0 || req.fd < 0 {
        return Err(gpio_error(
            chip,
            &format!("cannot request lines {offsets:?}"),
        ));
    }
    // SAFETY: the kernel handed us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(req.fd) })
}

/// The reject, READY and FAULT output lines.
pub struct Outputs {
    fd: OwnedFd,
    chip: std::path::PathBuf,
    /// Index in the request of each output, by [`OutputLine`] order.
    index: [Option<u32>; 3],
    bits: u64,
}

impl Outputs {
    pub fn open(
        chip: &Path,
        reject: u32,
        ready: Option<u32>,
        fault: Option<u32>,
    ) -> Result<Outputs> {
        let mut offsets = vec![reject];
        let mut index = [Some(0), None, None];
        for (slot, line) in [(1, ready), (2, fault)] {
            if let Some(l) = line {
                index[slot] = Some(offsets.len() as u32);
                offsets.push(l);
            }
        }
        Ok(Outputs {
            fd: request(chip, &offsets, FLAG_OUTPUT)?,
            chip: chip.to_path_buf(),
            index,
            bits: 0,
        })
    }
}

impl GpioOutputs for Outputs {
    fn set(&mut self, line: OutputLine, high: bool) -> Result<()> {
        let slot = match line {
            OutputLine::Reject => 0,
            OutputLine::Ready => 1,
            OutputLine::Fault => 2,
        };
        let Some(i) = self.index[slot] else {
            return Ok(());
        };
        if high {
            self.bits |= 1 << i;
        } else {
            self.bits &= !(1 << i);
        }
        let mut values = LineValues {
            bits: self.bits,
            mask: 1 << i,
        };
        // SAFETY: SET_VALUES takes a pointer to a gpio_v2_line_values, which LineValues mirrors.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                SET_VALUES as _,
                &mut values as *mut LineValues,
            )
        };
        if rc < 0 {
            return Err(gpio_error(&self.chip, "cannot set output"));
        }
        Ok(())
    }
}

/// Calls `on_edge` for each edge on an input line until `stop`.
fn watch_edges(
    chip: &Path,
    line: u32,
    rising: bool,
    stop: Arc<AtomicBool>,
    mut on_edge: impl FnMut() + Send + 'static,
) -> Result<()> {
    let flags = FLAG_INPUT
        | if rising {
            FLAG_EDGE_RISING
        } else {
            FLAG_EDGE_FALLING
        };
    let fd = request(chip, &[line], flags)?;
    std::thread::Builder::new()
        .name(format!("gpio-line-{line}"))
        .spawn(move || {
            let mut file = File::from(fd);
            let mut event = [0u8; EVENT_SIZE * 16];
            while !stop.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: file.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                    continue;
                }
                match file.read(&mut event) {
                    Ok(n) => (0..n / EVENT_SIZE).for_each(|_| on_edge()),
                    Err(e) => {
                        log::error!("GPIO line {line}: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .map_err(|e| Error::Device(format!("cannot start GPIO thread: {e}")))?;
    Ok(())
}

/// Sends a trigger for each edge on `line`.
pub fn spawn_trigger(
    chip: &Path,
    line: u32,
    rising: bool,
    trigger: Sender<()>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    watch_edges(chip, line, rising, stop, move || {
        if trigger.try_send(()).is_err() {
            log::warn!("GPIO trigger on line {line} while 16 triggers wait: ignored");
        }
    })
}

/// Counts rising edges of the encoder on `line`.
pub fn spawn_encoder(
    chip: &Path,
    line: u32,
    encoder: Arc<Encoder>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    watch_edges(chip, line, true, stop, move || {
        encoder.edge(std::time::Instant::now())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_match_the_kernel_uapi_sizes() {
        assert_eq!(std::mem::size_of::<LineAttribute>(), 16);
        assert_eq!(std::mem::size_of::<LineConfigAttribute>(), 24);
        assert_eq!(std::mem::size_of::<LineConfig>(), 272);
        assert_eq!(std::mem::size_of::<LineRequest>(), 592);
        assert_eq!(std::mem::size_of::<LineValues>(), 16);
        assert_eq!(GET_LINE, 0xC250_B407);
    }
}
