//! `station.toml`: what the station reads at start. Unknown keys are refused in every table and
//! every value is checked before anything starts, with errors that name the key
//! (`decision.deadline_ms`, ...).
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
    /// `cpu` or `cuda`.
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(deserialize_with = "tagged_table")]
    pub source: SourceConfig,
    #[serde(default, deserialize_with = "tagged_table")]
    pub trigger: TriggerConfig,
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
        /// Parts per second; 0 = as fast as the pipeline takes them.
        #[serde(default)]
        rate_hz: f64,
    },
    /// The synthetic product, generated on the fly.
    Synthetic {
        #[serde(default = "default_side")]
        height: usize,
        #[serde(default = "default_side")]
        width: usize,
        #[serde(default = "one")]
        channels: usize,
        #[serde(default)]
        seed: u64,
        /// Share of parts that carry a defect.
        #[serde(default)]
        defect_rate: f32,
        /// Parts to produce; 0 = endless.
        #[serde(default)]
        count: u64,
        #[serde(default)]
        rate_hz: f64,
    },
    /// A camera through nokhwa (build with `--features camera`).
    Camera {
        #[serde(default)]
        device: u32,
        width: u32,
        height: u32,
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
    /// A part without a verdict this long after its capture gets the fail-safe verdict.
    #[serde(default = "default_deadline")]
    pub deadline_ms: u64,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Optional region-of-interest mask (white = inspected); the score becomes the maximum of the
    /// anomaly map inside it.
    pub roi: Option<PathBuf>,
    /// How often the calibration file's modification time is checked; 0 = only on SIGHUP/RELOAD.
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
    /// Capacity of each channel between stages.
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
    /// Seconds between heartbeat lines; 0 = none.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_s: f64,
    /// Result lines kept while the port is gone; beyond, the oldest is dropped (and counted).
    #[serde(default = "default_serial_queue")]
    pub queue: usize,
    /// Pause between attempts to reopen a lost port.
    #[serde(default = "default_reconnect")]
    pub reconnect_ms: u64,
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
    #[serde(default = "default_pulse")]
    pub pulse_ms: u64,
    /// Delay from capture to the pulse, in milliseconds...
    pub delay_ms: Option<u64>,
    /// ... or in encoder counts on `encoder_line` (rising edges).
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
    #[serde(default = "default_audit_files")]
    pub max_parts: usize,
    #[serde(default = "default_audit_bytes")]
    pub max_bytes: u64,
}

fn default_audit_files() -> usize {
    1000
}
fn default_audit_bytes() -> u64 {
    512 << 20
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Seconds between status lines; 0 = none.
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

fn positive_rate(field: &str, rate: f64) -> Result<()> {
    if !(rate.is_finite() && rate >= 0.0) {
        return Err(bad(field, format!("{rate} is not a rate >= 0")));
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
        match &self.source {
            SourceConfig::Folder { rate_hz, .. } => positive_rate("source.rate_hz", *rate_hz)?,
            SourceConfig::Synthetic {
                height,
                width,
                channels,
                defect_rate,
                rate_hz,
                ..
            } => {
                positive_rate("source.rate_hz", *rate_hz)?;
                if !matches!(channels, 1 | 3) {
                    return Err(bad(
                        "source.channels",
                        format!("{channels} (must be 1 or 3)"),
                    ));
                }
                let min = crate::data::synth::SynthConfig::MIN_SIDE;
                if *height < min || *width < min {
                    return Err(bad(
                        "source.height",
                        format!("{height}x{width} is below the minimum side {min}"),
                    ));
                }
                if !(0.0..=1.0).contains(defect_rate) {
                    return Err(bad(
                        "source.defect_rate",
                        format!("{defect_rate} is not in 0..=1"),
                    ));
                }
            }
            SourceConfig::Camera {
                width,
                height,
                fps,
                pixel_format,
                ..
            } => {
                if *width == 0 || *height == 0 {
                    return Err(bad("source.width", format!("{width}x{height}")));
                }
                if *fps == 0 {
                    return Err(bad("source.fps", "must be at least 1"));
                }
                if !matches!(pixel_format.as_str(), "mjpeg" | "yuyv" | "gray") {
                    return Err(bad(
                        "source.pixel_format",
                        format!("`{pixel_format}` is not one of mjpeg, yuyv, gray"),
                    ));
                }
            }
        }
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
        if self.decision.deadline_ms == 0 {
            return Err(bad("decision.deadline_ms", "must be at least 1"));
        }
        if self.pipeline.queue == 0 {
            return Err(bad("pipeline.queue", "must be at least 1"));
        }
        if let Some(s) = &self.serial {
            if s.baud == 0 {
                return Err(bad("serial.baud", "must be positive"));
            }
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
            positive_rate("serial.heartbeat_s", s.heartbeat_s)?;
            if s.queue == 0 {
                return Err(bad("serial.queue", "must be at least 1"));
            }
        }
        if let Some(g) = &self.gpio {
            if g.pulse_ms == 0 {
                return Err(bad("gpio.pulse_ms", "must be at least 1"));
            }
            match (g.delay_ms, g.delay_counts, g.encoder_line) {
                (Some(_), None, _) | (None, Some(_), Some(_)) => {}
                (None, Some(_), None) => {
                    return Err(bad(
                        "gpio.encoder_line",
                        "delay_counts needs an encoder line",
                    ))
                }
                _ => {
                    return Err(bad(
                        "gpio.delay_ms",
                        "give exactly one of delay_ms, delay_counts",
                    ))
                }
            }
        }
        if let Some(a) = &self.audit {
            if a.max_parts == 0 {
                return Err(bad("audit.max_parts", "must be at least 1"));
            }
            if a.max_bytes == 0 {
                return Err(bad("audit.max_bytes", "must be at least 1"));
            }
        }
        positive_rate("status.interval_s", self.status.interval_s)?;
        Ok(())
    }
}
