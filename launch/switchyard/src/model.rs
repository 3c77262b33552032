//! `switchyard model`: the M/M/c queue with a dispatch delay, the yardstick
//! for "how many workers for this load, at what latency?".
//!
//! λ requests/s arrive (Poisson) at c identical workers serving μ requests/s
//! each (exponential service) from one shared queue, and every request pays
//! a fixed dispatch delay d (network, routing). With a = λ/μ and ρ = a/c:
//! P0 = 1 / (Σ_{k<c} a^k/k! + a^c / (c!(1−ρ))), L_q = P0 a^c ρ / (c!(1−ρ)²),
//! T = d + L_q/λ + 1/μ, and throughput = λ while ρ < 1 (c·μ beyond, when
//! the queue grows without bound).

use crate::svg::{Chart, Series};
use serde::Serialize;
use std::path::PathBuf;

/// Flags of `switchyard model`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ModelArgs {
    /// Arrival rate λ, requests per second.
    #[arg(long, default_value_t = 100.0)]
    pub(crate) lambda: f64,
    /// Service rate μ of one worker, requests per second.
    #[arg(long, default_value_t = 120.0)]
    pub(crate) mu: f64,
    /// Dispatch delay d added to every request, in milliseconds.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) delay_ms: f64,
    /// Evaluate c = 1 … this many workers.
    #[arg(long, default_value_t = 8)]
    pub(crate) max_workers: usize,
    /// Write SVG charts (latency and throughput against c) into this directory.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
}

/// The model's answer for one worker count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Prediction {
    pub(crate) workers: usize,
    pub(crate) rho: f64,
    /// Probability the system is empty (0 when unstable).
    pub(crate) p0: f64,
    /// Mean queue length (infinite when unstable).
    pub(crate) lq: f64,
    /// Mean time in system, seconds (infinite when unstable).
    pub(crate) time_s: f64,
    pub(crate) throughput: f64,
}

/// M/M/c with dispatch delay `delay_s`.
pub(crate) fn mmc(lambda: f64, mu: f64, workers: usize, delay_s: f64) -> Prediction {
    let c = workers as f64;
    let a = lambda / mu;
    let rho = a / c;
    if rho >= 1.0 {
        return Prediction {
            workers,
            rho,
            p0: 0.0,
            lq: f64::INFINITY,
            time_s: f64::INFINITY,
            throughput: c * mu,
        };
    }
    // Σ a^k/k! for k < c, and a^c/c!, built term by term (no factorial overflow).
    let mut term = 1.0;
    let mut sum = 0.0;
    for k in 0..workers {
        if k > 0 {
            term *= a / k as f64;
        }
        sum += term;
    }
    let last = term * a / c;
    let p0 = 1.0 / (sum + last / (1.0 - rho));
    let lq = p0 * last * rho / (1.0 - rho).powi(2);
    Prediction {
        workers,
        rho,
        p0,
        lq,
        time_s: delay_s + lq / lambda + 1.0 / mu,
        throughput: lambda,
    }
}

/// The table `switchyard model` prints.
pub(crate) fn table(args: &ModelArgs) -> (String, Vec<Prediction>) {
    let predictions: Vec<Prediction> = (1..=args.max_workers)
        .map(|c| mmc(args.lambda, args.mu, c, args.delay_ms / 1000.0))
        .collect();
    let mut out = format!(
        "M/M/c with dispatch delay: λ = {}/s, μ = {}/s per worker, d = {} ms\n\n\
         | workers c | ρ | P0 | L_q | T (ms) | throughput (/s) |\n|---:|---:|---:|---:|---:|---:|\n",
        args.lambda, args.mu, args.delay_ms
    );
    for p in &predictions {
        if p.time_s.is_finite() {
            out.push_str(&format!(
                "| {} | {:.3} | {:.4} | {:.4} | {:.2} | {:.1} |\n",
                p.workers,
                p.rho,
                p.p0,
                p.lq,
                p.time_s * 1000.0,
                p.throughput
            ));
        } else {
            out.push_str(&format!(
                "| {} | {:.3} | – | ∞ | ∞ (unstable) | {:.1} (capacity) |\n",
                p.workers, p.rho, p.throughput
            ));
        }
    }
    (out, predictions)
}

pub(crate) fn main(args: ModelArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    for (name, value) in [("--lambda", args.lambda), ("--mu", args.mu)] {
        if !(value > 0.0 && value.is_finite()) {
            return Err(format!("{name} must be a positive rate (got {value})").into());
        }
    }
    if !(args.delay_ms >= 0.0 && args.delay_ms.is_finite()) || args.max_workers == 0 {
        return Err("--delay-ms must be ≥ 0 and --max-workers ≥ 1".into());
    }
    let (text, predictions) = table(&args);
    print!("{text}");
    if let Some(dir) = &args.plot {
        std::fs::create_dir_all(dir)?;
        let latency = Chart {
            title: format!("M/M/c mean latency, λ = {}/s, μ = {}/s", args.lambda, args.mu),
            x_label: "workers c".into(),
            y_label: "T (ms)".into(),
            series: vec![Series {
                name: "M/M/c + d".into(),
                points: predictions
                    .iter()
                    .map(|p| (p.workers as f64, p.time_s * 1000.0))
                    .collect(),
                dots: false,
            }],
        };
        let throughput = Chart {
            title: "M/M/c throughput".into(),
            x_label: "workers c".into(),
            y_label: "requests/s".into(),
            series: vec![Series {
                name: "throughput".into(),
                points: predictions.iter().map(|p| (p.workers as f64, p.throughput)).collect(),
                dots: false,
            }],
        };
        std::fs::write(dir.join("model-latency.svg"), latency.render())?;
        std::fs::write(dir.join("model-throughput.svg"), throughput.render())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::mmc;

    #[test]
    fn one_worker_is_the_m_m_1_queue() {
        let p = mmc(100.0, 120.0, 1, 0.005);
        // L_q = ρ²/(1−ρ) = 4.1667; T = 5 ms + L_q/λ + 1/μ = 55 ms.
        assert!((p.lq - 25.0 / 6.0).abs() < 1e-9, "{p:?}");
        assert!((p.time_s - 0.055).abs() < 1e-9, "{p:?}");
        assert_eq!(p.throughput, 100.0);
    }

    #[test]
    fn two_workers_match_erlang_c_by_hand() {
        let p = mmc(100.0, 120.0, 2, 0.005);
        assert!((p.p0 - 0.411_76).abs() < 1e-4, "{p:?}");
        assert!((p.lq - 0.175_08).abs() < 1e-4, "{p:?}");
        assert!((p.time_s * 1000.0 - 15.084).abs() < 1e-2, "{p:?}");
    }

    #[test]
    fn an_overloaded_system_is_unstable_at_capacity() {
        let p = mmc(300.0, 120.0, 2, 0.005);
        assert!(p.time_s.is_infinite());
        assert_eq!(p.throughput, 240.0);
    }
}
