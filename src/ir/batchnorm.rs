//! What a folded BatchNormalization leaves behind for later passes and data-free ranges.

/// The statistics of a folded BatchNormalization, for passes that need the distribution of a
/// layer output after the fold (bias absorption, analytical bias correction): per output channel
/// `c`, the BN modelled the layer output as `N(beta[c], gamma[c]²)` (before any activation).
/// Keyed by tensor name, never by node index.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BatchNormRecord {
    /// The tensor the folded layer now writes (the BatchNormalization's output name).
    pub output: String,
    /// The layer's weight constant (already rescaled).
    pub weight: String,
    /// BN scale γ, per output channel (mapped through any per-channel Mul folded later).
    pub gamma: Vec<f32>,
    /// BN bias β, per output channel (mapped through any per-channel Mul/Add folded later).
    pub beta: Vec<f32>,
    /// BN running mean μ of the layer output before the BN.
    pub mean: Vec<f32>,
    /// BN running variance σ² of the layer output before the BN.
    pub var: Vec<f32>,
    pub epsilon: f32,
}
