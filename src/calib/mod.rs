//! Calibration: data sources (this issue: .npz/.npy), later streaming observers and statistics.

pub mod data;
