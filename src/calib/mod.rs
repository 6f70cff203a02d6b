//! Calibration: data sources (this issue: .npz/.npy), later streaming observers and statistics.

pub mod data;
pub mod datafree;
pub mod images;
pub mod observers;
pub mod source;
pub mod stats;
