//! Emulated devices.
pub mod serial;
