//! Calibration: the `calibration:` config, data sources (.npz/.npy shards, image folders),
//! streaming observers, the statistics file, and data-free ranges from BatchNorm statistics.

pub mod config;
pub mod control_flow;
pub mod data;
pub mod datafree;
pub mod images;
pub mod observers;
pub mod source;
pub mod stats;
