//! Choosing where tensors live: `--device cpu|cuda`.
use std::str::FromStr;

use candle_core::Device;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Cpu,
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            other => Err(Error::invalid(
                "device",
                format!("`{other}` is not one of cpu, cuda"),
            )),
        }
    }
}

impl DeviceChoice {
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda if !cfg!(feature = "cuda") => Err(Error::Device(
                "this vigil was built without CUDA; rebuild with `--features cuda` (needs nvcc)"
                    .into(),
            )),
            DeviceChoice::Cuda => Device::new_cuda(0)
                .map_err(|e| Error::Device(format!("cannot open CUDA device 0: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown() {
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert!("gpu"
            .parse::<DeviceChoice>()
            .unwrap_err()
            .to_string()
            .contains("gpu"));
        assert!(DeviceChoice::Cpu.open().unwrap().is_cpu());
        #[cfg(not(feature = "cuda"))]
        assert!(DeviceChoice::Cuda
            .open()
            .unwrap_err()
            .to_string()
            .contains("--features cuda"));
    }
}
