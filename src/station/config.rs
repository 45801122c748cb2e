//! `station.toml`: what the station reads at start. Unknown keys are refused in every table and
//! every value is checked before anything starts, with errors that name the key
//! (`decision.deadline_ms`, ...) and, for sizes and intervals, the bounds. The bounds keep a typo
//! from becoming a 30 TB allocation or a busy loop; they are documented on each field and in
//! systemd/station.toml.
use std::fmt::Display;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::de::value::EnumAccessDeserializer;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};
use serde::{Deserialize, Deserializer};

use crate::device::DeviceChoice;
use crate::error::{Error, Result};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StationConfig {
    /// Model file written by `vigil train`.
    pub model: PathBuf,
    /// Calibration written by `vigil calibrate` for that model; reloaded on SIGHUP and on change.
    pub calibration: PathBuf,
    /// Folder where the station keeps its run counter across restarts; None = the model file's
    /// folder.
    pub state_dir: Option<PathBuf>,
    /// `cpu` or `cuda`.
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(deserialize_with = "tagged_table")]
    pub source: SourceConfig,
    #[serde(default, deserialize_with = "tagged_table")]
    pub trigger: TriggerConfig,
    #[serde(default)]
    pub input: InputConfig,
    #[serde(default)]
    pub decision: DecisionConfig,
    #[serde(default)]
    pub pipeline: PipelineConfig,
    pub serial: Option<SerialConfig>,
    pub json: Option<JsonConfig>,
    pub gpio: Option<GpioConfig>,
    pub audit: Option<AuditConfig>,
    #[serde(default)]
    pub status: StatusConfig,
}

fn default_device() -> String {
    "cpu".into()
}

/// Largest side of a synthetic part (as `vigil synth` allows).
const SYNTHETIC_MAX_SIDE: usize = 8192;

/// `[source]`: `kind` names the variant, beside its keys (read by [`tagged_table`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Image files of a folder in name order.
    Folder {
        path: PathBuf,
        /// Start again at the first file after the last.
        #[serde(default, rename = "loop")]
        looped: bool,
        /// Parts per second, 0..=10000; 0 = as fast as the pipeline takes them.
        #[serde(default)]
        rate_hz: f64,
    },
    /// The synthetic product, generated on the fly.
    Synthetic {
        /// Pixels, 16..=8192.
        #[serde(default = "default_side")]
        height: usize,
        /// Pixels, 16..=8192.
        #[serde(default = "default_side")]
        width: usize,
        /// 1 or 3.
        #[serde(default = "one")]
        channels: usize,
        #[serde(default)]
        seed: u64,
        /// Share of parts that carry a defect, 0..=1.
        #[serde(default)]
        defect_rate: f32,
        /// Parts to produce; 0 = endless.
        #[serde(default)]
        count: u64,
        /// Parts per second, 0..=10000; 0 = as fast as the pipeline takes them.
        #[serde(default)]
        rate_hz: f64,
    },
    /// A camera through nokhwa (build with `--features camera`).
    Camera {
        #[serde(default)]
        device: u32,
        /// Pixels, 1..=16384.
        width: u32,
        /// Pixels, 1..=16384.
        height: u32,
        /// Frames per second, 1..=1000.
        #[serde(default = "default_fps")]
        fps: u32,
        /// `mjpeg`, `yuyv` or `gray`.
        #[serde(default = "default_pixel_format")]
        pixel_format: String,
    },
}

fn default_side() -> usize {
    128
}
fn one() -> usize {
    1
}
fn default_fps() -> u32 {
    30
}
fn default_pixel_format() -> String {
    "mjpeg".into()
}

/// What starts a capture: `[trigger]`, with `kind` beside the variant's keys (read by
/// [`tagged_table`]).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum TriggerConfig {
    /// The source's own pace.
    #[default]
    FreeRun,
    /// A `TRIG` line on the serial port.
    Serial,
    /// An edge on a GPIO input line (build with `--features gpio`).
    Gpio {
        #[serde(default = "default_chip")]
        chip: PathBuf,
        line: u32,
        /// `rising` or `falling`.
        #[serde(default = "default_edge")]
        edge: String,
    },
}

/// Reads a table whose `kind` key names the enum variant and whose other keys are the variant's.
///
/// Serde's own internally tagged enums buffer the table before choosing the variant, which
/// loses the key an error is about (`invalid type ..., expected u32`, but which key?) and
/// ignores extra keys of a unit variant (`kind = "free-run"` with `line = 17` would run). Here
/// the variant's keys are read directly from the table, so errors name them.
fn tagged_table<'de, D, T>(deserializer: D) -> std::result::Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let mut keys = toml::Table::deserialize(deserializer)?;
    let kind = match keys.remove("kind") {
        Some(toml::Value::String(kind)) => kind,
        Some(other) => {
            return Err(de::Error::custom(format!(
                "`kind` must be a string, not {}",
                other.type_str()
            )))
        }
        None => return Err(de::Error::missing_field("kind")),
    };
    T::deserialize(EnumAccessDeserializer::new(TaggedTable { kind, keys }))
        .map_err(|e| de::Error::custom(e.to_string().trim_end()))
}

/// A table split into its `kind` and its other keys, handed to serde as an enum.
struct TaggedTable {
    kind: String,
    keys: toml::Table,
}

impl<'de> de::EnumAccess<'de> for TaggedTable {
    type Error = toml::de::Error;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> std::result::Result<(V::Value, Self), Self::Error> {
        let kind: de::value::StrDeserializer<'_, toml::de::Error> =
            self.kind.as_str().into_deserializer();
        let variant = seed
            .deserialize(kind)
            .map_err(|e| de::Error::custom(format!("`kind`: {}", e.message())))?;
        Ok((variant, self))
    }
}

impl<'de> de::VariantAccess<'de> for TaggedTable {
    type Error = toml::de::Error;

    fn unit_variant(self) -> std::result::Result<(), Self::Error> {
        match self.keys.keys().next() {
            Some(key) => Err(de::Error::custom(format!(
                "unknown field `{key}`: kind `{}` takes no other key",
                self.kind
            ))),
            None => Ok(()),
        }
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> std::result::Result<S::Value, Self::Error> {
        seed.deserialize(self.keys)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        de::Deserializer::deserialize_seq(self.keys, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        de::Deserializer::deserialize_struct(self.keys, "", fields, visitor)
    }
}

fn default_chip() -> PathBuf {
    "/dev/gpiochip0".into()
}
fn default_edge() -> String {
    "rising".into()
}

/// Limits of a decoded frame, checked from the image header before decoding: a small file can
/// decode to gigabytes, which would exhaust the memory and hold up the parts behind it. A frame
/// beyond them is a failed part (fail-safe verdict with the reason).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// Pixels, 1..=65535.
    #[serde(default = "default_max_side")]
    pub max_width: u32,
    /// Pixels, 1..=65535.
    #[serde(default = "default_max_side")]
    pub max_height: u32,
    /// Bytes of the decoded pixels, 1 MiB..=16 GiB.
    #[serde(default = "default_max_frame_bytes")]
    pub max_bytes: u64,
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            max_width: default_max_side(),
            max_height: default_max_side(),
            max_bytes: default_max_frame_bytes(),
        }
    }
}

fn default_max_side() -> u32 {
    8192
}
fn default_max_frame_bytes() -> u64 {
    256 << 20
}

/// What the PLC is told when a part could not be judged.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Reject it (fail-safe NG).
    #[default]
    Ng,
    /// Report ERR; the PLC must treat ERR as a reject.
    Err,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionConfig {
    /// A part without a verdict this long after its capture gets the fail-safe verdict;
    /// 1..=600000.
    #[serde(default = "default_deadline")]
    pub deadline_ms: u64,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Optional region-of-interest mask (white = inspected); the score becomes the maximum of the
    /// anomaly map inside it.
    pub roi: Option<PathBuf>,
    /// How often the calibration file is checked for a change, 50..=3600000; 0 = only on
    /// SIGHUP/RELOAD.
    #[serde(default = "default_reload_poll")]
    pub reload_poll_ms: u64,
}

impl Default for DecisionConfig {
    fn default() -> Self {
        DecisionConfig {
            deadline_ms: default_deadline(),
            on_failure: OnFailure::Ng,
            roi: None,
            reload_poll_ms: default_reload_poll(),
        }
    }
}

fn default_deadline() -> u64 {
    1000
}
fn default_reload_poll() -> u64 {
    1000
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Capacity of each channel between stages, 1..=1024 (channels allocate it up front, and
    /// parts waiting here wait for their verdict too).
    #[serde(default = "default_queue")]
    pub queue: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            queue: default_queue(),
        }
    }
}

fn default_queue() -> usize {
    2
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    pub port: PathBuf,
    /// 50..=4000000.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// 7 or 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// `none`, `even` or `odd`.
    #[serde(default = "default_parity")]
    pub parity: String,
    /// 1 or 2.
    #[serde(default = "one_u8")]
    pub stop_bits: u8,
    /// Seconds between heartbeat lines, 0.05..=3600; 0 = none.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_s: f64,
    /// Result lines kept while the port is gone, 1..=1000000; beyond, the oldest is dropped (and
    /// counted).
    #[serde(default = "default_serial_queue")]
    pub queue: usize,
    /// Pause between attempts to reopen a lost port, 10..=60000.
    #[serde(default = "default_reconnect")]
    pub reconnect_ms: u64,
    /// Acknowledged mode: the PLC answers `ACK <id>`, and result lines not yet acknowledged are
    /// sent again after a reconnection as `REP` lines.
    #[serde(default)]
    pub ack: bool,
}

fn default_baud() -> u32 {
    115_200
}
fn default_data_bits() -> u8 {
    8
}
fn default_parity() -> String {
    "none".into()
}
fn one_u8() -> u8 {
    1
}
fn default_heartbeat() -> f64 {
    1.0
}
fn default_serial_queue() -> usize {
    10_000
}
fn default_reconnect() -> u64 {
    500
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonConfig {
    /// A file to append to, or `-` for stdout.
    pub path: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioConfig {
    #[serde(default = "default_chip")]
    pub chip: PathBuf,
    /// Output line pulsed for a rejected part.
    pub reject_line: u32,
    pub ready_line: Option<u32>,
    pub fault_line: Option<u32>,
    /// Width of the reject pulse, 1..=10000.
    #[serde(default = "default_pulse")]
    pub pulse_ms: u64,
    /// Delay from capture to the pulse, in milliseconds (at most 600000)...
    pub delay_ms: Option<u64>,
    /// ... or in encoder counts on `encoder_line` (rising edges), at least 1.
    pub delay_counts: Option<u64>,
    pub encoder_line: Option<u32>,
}

fn default_pulse() -> u64 {
    50
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    pub dir: PathBuf,
    /// Rejected parts kept, 1..=10000000.
    #[serde(default = "default_audit_files")]
    pub max_parts: usize,
    /// Bytes kept, at least 1.
    #[serde(default = "default_audit_bytes")]
    pub max_bytes: u64,
    /// Free space the audit leaves on its partition, at most 1 TiB; the oldest parts go first.
    #[serde(default = "default_audit_min_free")]
    pub min_free_bytes: u64,
}

fn default_audit_files() -> usize {
    1000
}
fn default_audit_bytes() -> u64 {
    512 << 20
}
fn default_audit_min_free() -> u64 {
    256 << 20
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Seconds between status lines, 0.1..=86400; 0 = none.
    #[serde(default = "default_status")]
    pub interval_s: f64,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            interval_s: default_status(),
        }
    }
}

fn default_status() -> f64 {
    10.0
}

fn bad(field: &str, reason: impl Into<String>) -> Error {
    Error::config(field, reason)
}

/// `value` must lie in `bounds` (which no NaN or infinity does).
fn within<T: PartialOrd + Display>(field: &str, value: T, bounds: RangeInclusive<T>) -> Result<()> {
    if bounds.contains(&value) {
        return Ok(());
    }
    Err(bad(
        field,
        format!("{value} is outside {}..={}", bounds.start(), bounds.end()),
    ))
}

/// An interval that 0 switches off; any other value must lie in `bounds`.
fn off_or_within<T: PartialOrd + Display + Default>(
    field: &str,
    value: T,
    bounds: RangeInclusive<T>,
) -> Result<()> {
    if value == T::default() || bounds.contains(&value) {
        return Ok(());
    }
    Err(bad(
        field,
        format!(
            "{value} is neither 0 (off) nor in {}..={}",
            bounds.start(),
            bounds.end()
        ),
    ))
}

fn at_least(field: &str, value: u64, min: u64) -> Result<()> {
    if value < min {
        return Err(bad(field, format!("{value} is below the minimum {min}")));
    }
    Ok(())
}

impl StationConfig {
    /// Reads and validates a station file; relative paths are taken from the file's folder.
    pub fn load(path: &Path) -> Result<StationConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut cfg = StationConfig::parse(&text, &path.display().to_string())?;
        if let Some(base) = path.parent() {
            cfg.resolve_relative(base);
        }
        Ok(cfg)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<StationConfig> {
        let cfg: StationConfig =
            toml::from_str(text).map_err(|e| bad(origin, e.to_string().trim_end().to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn resolve_relative(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && p.as_os_str() != "-" {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.model);
        fix(&mut self.calibration);
        if let Some(state_dir) = &mut self.state_dir {
            fix(state_dir);
        }
        if let SourceConfig::Folder { path, .. } = &mut self.source {
            fix(path);
        }
        if let Some(roi) = &mut self.decision.roi {
            fix(roi);
        }
        if let Some(json) = &mut self.json {
            fix(&mut json.path);
        }
        if let Some(audit) = &mut self.audit {
            fix(&mut audit.dir);
        }
    }

    pub fn device_choice(&self) -> Result<DeviceChoice> {
        self.device.parse().map_err(|_| {
            bad(
                "device",
                format!("`{}` is not one of cpu, cuda", self.device),
            )
        })
    }

    pub fn validate(&self) -> Result<()> {
        self.device_choice()?;
        if self
            .state_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(bad(
                "state_dir",
                "is empty (leave it out for the model's folder)",
            ));
        }
        self.validate_source()?;
        match &self.trigger {
            TriggerConfig::Serial if self.serial.is_none() => {
                return Err(bad("trigger.kind", "`serial` needs a [serial] section"));
            }
            TriggerConfig::Gpio { edge, .. } if !matches!(edge.as_str(), "rising" | "falling") => {
                return Err(bad(
                    "trigger.edge",
                    format!("`{edge}` is not one of rising, falling"),
                ));
            }
            _ => {}
        }
        within("input.max_width", self.input.max_width, 1..=65_535)?;
        within("input.max_height", self.input.max_height, 1..=65_535)?;
        within("input.max_bytes", self.input.max_bytes, 1 << 20..=16 << 30)?;
        within(
            "decision.deadline_ms",
            self.decision.deadline_ms,
            1..=600_000,
        )?;
        off_or_within(
            "decision.reload_poll_ms",
            self.decision.reload_poll_ms,
            50..=3_600_000,
        )?;
        within("pipeline.queue", self.pipeline.queue, 1..=1024)?;
        if let Some(s) = &self.serial {
            validate_serial(s)?;
        }
        if let Some(g) = &self.gpio {
            validate_gpio(g)?;
        }
        if let Some(a) = &self.audit {
            within("audit.max_parts", a.max_parts, 1..=10_000_000)?;
            at_least("audit.max_bytes", a.max_bytes, 1)?;
            within("audit.min_free_bytes", a.min_free_bytes, 0..=1 << 40)?;
        }
        off_or_within("status.interval_s", self.status.interval_s, 0.1..=86_400.0)?;
        Ok(())
    }

    fn validate_source(&self) -> Result<()> {
        match &self.source {
            SourceConfig::Folder { rate_hz, .. } => {
                within("source.rate_hz", *rate_hz, 0.0..=10_000.0)
            }
            SourceConfig::Synthetic {
                height,
                width,
                channels,
                defect_rate,
                rate_hz,
                ..
            } => {
                within("source.rate_hz", *rate_hz, 0.0..=10_000.0)?;
                if !matches!(channels, 1 | 3) {
                    return Err(bad(
                        "source.channels",
                        format!("{channels} (must be 1 or 3)"),
                    ));
                }
                let sides = crate::data::synth::SynthConfig::MIN_SIDE..=SYNTHETIC_MAX_SIDE;
                within("source.height", *height, sides.clone())?;
                within("source.width", *width, sides)?;
                if !(0.0..=1.0).contains(defect_rate) {
                    return Err(bad(
                        "source.defect_rate",
                        format!("{defect_rate} is not in 0..=1"),
                    ));
                }
                Ok(())
            }
            SourceConfig::Camera {
                width,
                height,
                fps,
                pixel_format,
                ..
            } => {
                within("source.width", *width, 1..=16_384)?;
                within("source.height", *height, 1..=16_384)?;
                within("source.fps", *fps, 1..=1000)?;
                if !matches!(pixel_format.as_str(), "mjpeg" | "yuyv" | "gray") {
                    return Err(bad(
                        "source.pixel_format",
                        format!("`{pixel_format}` is not one of mjpeg, yuyv, gray"),
                    ));
                }
                Ok(())
            }
        }
    }
}

fn validate_serial(s: &SerialConfig) -> Result<()> {
    within("serial.baud", s.baud, 50..=4_000_000)?;
    if !matches!(s.data_bits, 7 | 8) {
        return Err(bad("serial.data_bits", format!("{} (7 or 8)", s.data_bits)));
    }
    if !matches!(s.parity.as_str(), "none" | "even" | "odd") {
        return Err(bad(
            "serial.parity",
            format!("`{}` is not one of none, even, odd", s.parity),
        ));
    }
    if !matches!(s.stop_bits, 1 | 2) {
        return Err(bad("serial.stop_bits", format!("{} (1 or 2)", s.stop_bits)));
    }
    off_or_within("serial.heartbeat_s", s.heartbeat_s, 0.05..=3600.0)?;
    within("serial.queue", s.queue, 1..=1_000_000)?;
    within("serial.reconnect_ms", s.reconnect_ms, 10..=60_000)
}

fn validate_gpio(g: &GpioConfig) -> Result<()> {
    within("gpio.pulse_ms", g.pulse_ms, 1..=10_000)?;
    match (g.delay_ms, g.delay_counts, g.encoder_line) {
        (Some(ms), None, _) => within("gpio.delay_ms", ms, 0..=600_000),
        (None, Some(counts), Some(_)) => at_least("gpio.delay_counts", counts, 1),
        (None, Some(_), None) => Err(bad(
            "gpio.encoder_line",
            "delay_counts needs an encoder line",
        )),
        _ => Err(bad(
            "gpio.delay_ms",
            "give exactly one of delay_ms, delay_counts",
        )),
    }
}
