//! Output noise of quantized variants of one float model, measured in the job's engine (tract
//! or ONNX Runtime) on a fixed set of samples: the measuring instrument of the mixed-precision
//! search (`quant::mixed`) and the guard.
//!
//! The float model runs once; its outputs are kept. Each variant (a plan applied to the model,
//! which is the float model, or the float model with the plan passes' corrected biases: see
//! [`Probe::against`]) is materialised and run on the same samples: in tract lowered to float
//! fake-quant arithmetic like `verify` does, in ONNX Runtime as written (its Q/DQ kernels, as
//! users deploy it); its noise is Σ(f − q)² per float output, summed in sample order, so the
//! figures do not depend on the thread count.
//!
//! Memory: a run keeps only the model outputs (tract drops every other tensor after its last
//! reader), and the float outputs of the probe samples are what the probe holds (samples ×
//! output size, e.g. 32 × 3.7 MB for a 960×960 detector). Runs at once (samples, and variants
//! in `noises`) are as many as the memory budget fits ([`crate::runtime::memory`]).

use rayon::prelude::*;
use tract_onnx::prelude::*;

use crate::calib::source::DataSource;
use crate::error::{Error, Result};
use crate::ir::Model;
use crate::quant::plan::Plan;
use crate::runtime::memory::{on_threads, Parallelism};
use crate::runtime::{to_f32_vec, Engine, EngineRunner};
use crate::verify::lower::lower_all_qdq;
use crate::verify::metrics::sqnr_from_sums;

/// The float model's outputs on the probe samples, and the signal power of each float output.
pub struct Probe<'a> {
    /// The model whose outputs are the reference.
    float: &'a Model,
    /// The model plans are applied to: `float`, or `float` with biases the plan passes corrected.
    model: &'a Model,
    data: &'a DataSource,
    samples: usize,
    engine: Engine,
    shapes: Vec<(String, DatumType, Vec<usize>)>,
    /// Indices of the float outputs (integer outputs are not compared).
    compared: Vec<usize>,
    pub output_names: Vec<String>,
    /// `float_outputs[sample][k]`: the k-th compared output.
    float_outputs: Vec<Vec<Vec<f32>>>,
    /// Σ f² per compared output.
    pub signal: Vec<f64>,
    /// `sample_signal[sample][k]`: Σ f² of one sample.
    sample_signal: Vec<Vec<f64>>,
    /// Runs at once, from the float model's peak per sample.
    parallel: usize,
}

/// Noise power per compared output, Σ(f − q)² over the probe samples.
pub type Noise = Vec<f64>;

/// Noise power per sample and compared output.
pub type SampleNoise = Vec<Vec<f64>>;

/// Bootstrap resamples for the lower confidence bound of the SQNR.
const RESAMPLES: usize = 1000;
/// The bound's percentile: the SQNR is at least this high with 90% confidence.
const LOWER_PERCENTILE: f64 = 10.0;

impl<'a> Probe<'a> {
    /// Runs the float model on the first `samples` samples of `data` in `engine`.
    pub fn new(float: &'a Model, data: &'a DataSource, samples: usize, engine: Engine) -> Result<Probe<'a>> {
        Probe::against(float, float, data, samples, engine)
    }

    /// A probe whose variants are plans applied to `model`, measured against the outputs of
    /// `float`: the same graph, whose biases the plan passes changed in `model` (bias correction
    /// corrects what quantization shifts, so against the float model itself it adds noise).
    pub fn against(
        float: &'a Model,
        model: &'a Model,
        data: &'a DataSource,
        samples: usize,
        engine: Engine,
    ) -> Result<Probe<'a>> {
        let samples = samples.min(data.len());
        if samples == 0 {
            return Err(Error::Usage(
                "mixed precision needs at least one calibration sample".into(),
            ));
        }
        let shapes = data.sample_shapes()?;
        let runner = EngineRunner::new(engine, float, &shapes, &[])?;
        let parallel = runner.parallelism()?.samples;
        let outputs = on_threads(parallel, || {
            runner.run_all(
                samples,
                |i| data.sample(i),
                |_, outs| {
                    outs.iter()
                        .map(|v| Ok((v.datum_type(), to_f32_vec(v)?)))
                        .collect::<Result<Vec<_>>>()
                },
            )
        })??;
        let compared: Vec<usize> = (0..runner.outputs().len())
            .filter(|&k| outputs[0][k].0.is_float())
            .collect();
        if compared.is_empty() {
            return Err(Error::Usage(
                "mixed precision compares float outputs, and this model has none".into(),
            ));
        }
        let float_outputs: Vec<Vec<Vec<f32>>> = outputs
            .into_iter()
            .map(|sample| {
                let mut sample: Vec<Option<Vec<f32>>> = sample.into_iter().map(|(_, v)| Some(v)).collect();
                compared.iter().map(|&k| sample[k].take().expect("each once")).collect()
            })
            .collect();
        let sample_signal: Vec<Vec<f64>> = float_outputs
            .iter()
            .map(|s| {
                s.iter()
                    .map(|o| o.iter().map(|&v| (v as f64) * (v as f64)).sum())
                    .collect()
            })
            .collect();
        let signal = sum_samples(&sample_signal);
        Ok(Probe {
            float,
            model,
            data,
            samples,
            engine,
            shapes,
            output_names: compared.iter().map(|&k| runner.outputs()[k].clone()).collect(),
            compared,
            float_outputs,
            signal,
            sample_signal,
            parallel,
        })
    }

    pub fn samples(&self) -> usize {
        self.samples
    }

    /// The engine the variants run in.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The same probe on its first `samples` samples (the float outputs are copied, not rerun).
    pub fn first(&self, samples: usize) -> Probe<'a> {
        let samples = samples.clamp(1, self.samples);
        let sample_signal = self.sample_signal[..samples].to_vec();
        Probe {
            float: self.float,
            model: self.model,
            data: self.data,
            samples,
            engine: self.engine,
            shapes: self.shapes.clone(),
            compared: self.compared.clone(),
            output_names: self.output_names.clone(),
            float_outputs: self.float_outputs[..samples].to_vec(),
            signal: sum_samples(&sample_signal),
            sample_signal,
            parallel: self.parallel,
        }
    }

    /// The noise of the float model with `plan` applied.
    pub fn noise(&self, plan: &Plan) -> Result<Noise> {
        Ok(sum_samples(&self.sample_noise(plan)?))
    }

    /// The noise of each sample with `plan` applied.
    pub fn sample_noise(&self, plan: &Plan) -> Result<SampleNoise> {
        self.sample_noise_of_written(plan, false)
    }

    /// [`Probe::sample_noise`] without the float16 rounding of activations
    /// (`verify::lower::skip_float16_rounding`): a search's estimate, much faster in tract once
    /// layers are float16; the same as exact when the plan has none, and in ONNX Runtime.
    pub fn sample_noise_unrounded(&self, plan: &Plan) -> Result<SampleNoise> {
        self.sample_noise_of_written(plan, true)
    }

    fn sample_noise_of_written(&self, plan: &Plan, unrounded: bool) -> Result<SampleNoise> {
        let mut model = self.model.clone();
        crate::quant::materialize::materialize(&mut model, plan)?;
        let runner = match self.engine {
            Engine::Tract => {
                let mut lowered = lower_all_qdq(&model)?;
                if unrounded {
                    crate::verify::lower::skip_float16_rounding(&mut lowered.graph)?;
                }
                EngineRunner::new(Engine::Tract, &lowered, &self.shapes, &[])?
            }
            Engine::Onnxruntime => EngineRunner::new(Engine::Onnxruntime, &model, &self.shapes, &[])?,
        };
        self.noise_of(&runner, &[])
    }

    /// Each sample's noise of `runner`'s model, fed each sample followed by `extra`.
    fn noise_of(&self, runner: &EngineRunner, extra: &[TValue]) -> Result<SampleNoise> {
        on_threads(self.parallel, || {
            runner.run_all(
                self.samples,
                |i| {
                    let mut inputs = self.data.sample(i)?;
                    inputs.extend(extra.iter().cloned());
                    Ok(inputs)
                },
                |i, outs| self.compare(i, runner.outputs(), &outs),
            )
        })?
    }

    /// Σ(f − q)² per compared output of sample `i`, `outs` being the tensors named `names`.
    fn compare(&self, i: usize, names: &[String], outs: &[TValue]) -> Result<Vec<f64>> {
        self.compared
            .iter()
            .zip(&self.float_outputs[i])
            .map(|(&k, f)| {
                let q = to_f32_vec(&outs[k])?;
                if q.len() != f.len() {
                    return Err(Error::Runtime(format!(
                        "output '{}' has {} values in the quantized model, {} in the float one",
                        names[k],
                        q.len(),
                        f.len()
                    )));
                }
                Ok(f.iter().zip(&q).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum::<f64>())
            })
            .collect()
    }

    /// The variants of `base` (subsets of its layers, some at int16), each measured by one run
    /// of one compiled model (`quant::switched`).
    pub fn variants(&self, base: &Plan) -> Result<Variants<'_, 'a>> {
        let ranks = crate::runtime::tensor_ranks(self.model, &self.shapes)?;
        let switched = crate::quant::switched::build(self.float, self.model, base, &ranks)?;
        let mut shapes = self.shapes.clone();
        shapes.extend(switched.extra_inputs.iter().cloned());
        let runner = EngineRunner::new(self.engine, &switched.model, &shapes, &[])?;
        Ok(Variants {
            probe: self,
            switched,
            runner,
        })
    }

    /// The noise of several plans, measured in parallel; results in the order of `plans`.
    pub fn noises(&self, plans: &[Plan]) -> Result<Vec<Noise>> {
        on_threads(self.parallel, || plans.par_iter().map(|p| self.noise(p)).collect())?
    }

    /// The output SQNR of per-sample noise and its lower confidence bound ([`Probe::sqnr_db`],
    /// [`Probe::sqnr_lower_db`]).
    pub fn figures(&self, noise: &SampleNoise) -> (f64, f64) {
        (self.sqnr_db(&sum_samples(noise)), self.sqnr_lower_db(noise))
    }

    /// A lower confidence bound of the output SQNR over the input distribution: the 10th
    /// percentile of the SQNR over bootstrap resamples of the probe samples (fixed seed, so
    /// deterministic). Few samples or a few bad ones pull it down.
    pub fn sqnr_lower_db(&self, noise: &SampleNoise) -> f64 {
        let n = noise.len();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            // xorshift64*: a fixed, portable sequence.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let outputs = self.signal.len();
        let mut values: Vec<f64> = (0..RESAMPLES)
            .map(|_| {
                let (mut s, mut e) = (vec![0.0; outputs], vec![0.0; outputs]);
                for _ in 0..n {
                    let i = (next() % n as u64) as usize;
                    for k in 0..outputs {
                        s[k] += self.sample_signal[i][k];
                        e[k] += noise[i][k];
                    }
                }
                worst_sqnr_db(&s, &e)
            })
            .collect();
        values.sort_by(f64::total_cmp);
        values[((LOWER_PERCENTILE / 100.0) * RESAMPLES as f64) as usize]
    }

    /// Output SQNR in dB: the worst compared output.
    pub fn sqnr_db(&self, noise: &[f64]) -> f64 {
        worst_sqnr_db(&self.signal, noise)
    }
}

/// Variants of one plan, measured on a probe's samples with one compiled model.
pub struct Variants<'p, 'a> {
    pub probe: &'p Probe<'a>,
    switched: crate::quant::switched::SwitchedModel,
    runner: EngineRunner,
}

impl Variants<'_, '_> {
    /// The noise of the variant `plan`, per sample.
    pub fn sample_noise(&self, plan: &Plan) -> Result<SampleNoise> {
        self.probe.noise_of(&self.runner, &self.switched.inputs_for(plan))
    }

    /// The noise of each variant, in the order of `plans`, summed over samples. The samples run
    /// in parallel; each first with every switch off (the float model), its values kept, then
    /// as each variant, computing again only the nodes the variant's switches reach: a layer's
    /// variant reuses everything upstream of the layer (on ppocr_v3_rec's 80 layers alone,
    /// about half of each run). When keeping a sample's values would cost parallelism under the
    /// memory budget, and in ONNX Runtime, each variant runs whole instead (the same figures,
    /// bit for bit, in tract). `label`
    /// names the work on the progress line, printed as the samples finish.
    pub fn noises(&self, plans: &[Plan], label: &str) -> Result<Vec<Noise>> {
        let Some(first) = plans.first() else {
            return Ok(vec![]);
        };
        let probe = self.probe;
        let names = self.runner.outputs();
        let off = self.switched.inputs_for(&first.restricted_to(&Default::default()));
        let extras: Vec<Vec<TValue>> = plans.iter().map(|p| self.switched.inputs_for(p)).collect();
        // tract computes again only what a variant's switches reach; ONNX Runtime, which has no
        // per-node hook, runs each variant whole.
        let reusing = match &self.runner {
            EngineRunner::Tract(runner) => {
                let recording = runner.sample_bytes()? + runner.recording_bytes()?;
                if Parallelism::for_samples(recording).samples >= probe.parallel {
                    let data_inputs = probe.shapes.len();
                    let dependents: Vec<Vec<bool>> = extras
                        .iter()
                        .map(|extra| {
                            let changed: Vec<usize> = (0..extra.len())
                                .filter(|&j| extra[j] != off[j])
                                .map(|j| data_inputs + j)
                                .collect();
                            runner.dependents(&changed)
                        })
                        .collect::<Result<_>>()?;
                    Some((runner, dependents))
                } else {
                    None
                }
            }
            EngineRunner::Onnxruntime(_) => None,
        };
        let started = std::time::Instant::now();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let per_sample: Vec<Vec<Vec<f64>>> = on_threads(probe.parallel, || {
            (0..probe.samples)
                .into_par_iter()
                .map(|i| {
                    let sample = probe.data.sample(i)?;
                    let inputs = |extra: &[TValue]| {
                        let mut v = sample.clone();
                        v.extend(extra.iter().cloned());
                        v
                    };
                    let noises = if let Some((runner, dependents)) = &reusing {
                        let (_, recorded) = runner.run_recording(inputs(&off))?;
                        extras
                            .iter()
                            .zip(dependents)
                            .map(|(e, d)| probe.compare(i, names, &runner.run_reusing(inputs(e), &recorded, d)?))
                            .collect::<Result<Vec<_>>>()?
                    } else {
                        extras
                            .iter()
                            .map(|e| probe.compare(i, names, &self.runner.run(inputs(e))?))
                            .collect::<Result<Vec<_>>>()?
                    };
                    let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    eprintln!(
                        "onnxq: {label}: {} variants, sample {n} of {}, {:.1} s",
                        plans.len(),
                        probe.samples,
                        started.elapsed().as_secs_f64()
                    );
                    Ok(noises)
                })
                .collect::<Result<Vec<_>>>()
        })??;
        Ok((0..plans.len())
            .map(|p| sum_samples(&per_sample.iter().map(|s| s[p].clone()).collect::<Vec<_>>()))
            .collect())
    }
}

/// Per-output sums over samples, in sample order.
pub fn sum_samples(per_sample: &[Vec<f64>]) -> Vec<f64> {
    let mut total = vec![0.0; per_sample.first().map_or(0, Vec::len)];
    for sample in per_sample {
        for (t, v) in total.iter_mut().zip(sample) {
            *t += v;
        }
    }
    total
}

/// SQNR in dB of the worst output, from per-output Σf² and Σ(f − q)² (a negative noise, which
/// the additive predictions of `quant::mixed` can reach, counts as none).
pub fn worst_sqnr_db(signal: &[f64], noise: &[f64]) -> f64 {
    signal
        .iter()
        .zip(noise)
        .map(|(&s, &n)| sqnr_from_sums(s, n.max(0.0)))
        .fold(f64::INFINITY, f64::min)
}
