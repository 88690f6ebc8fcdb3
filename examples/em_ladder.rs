//! Seed 001's ladder on real digits: one mixture of Bernoullis (K components) fitted from the
//! same start by exact EM, Monte Carlo EM, generalized EM and variational EM (mean field over
//! the assignments and the parameters, under Dirichlet and Beta priors). Writes the
//! per-iteration log-likelihood and ELBO of each as JSON (plotted by `scripts/plot_ladder.py`),
//! the exact-EM prototypes as a PNG grid, and prints the test log-likelihood.
//!
//! ```text
//! cargo run --release --example em_ladder -- DATA_DIR OUT_DIR [K] [ITERS]
//! python3 scripts/plot_ladder.py OUT_DIR/ladder.json OUT_DIR/ladder.png
//! ```

use gm::candle::{Device, Tensor};
use gm::data::{load_split, Split};
use gm::ladder::{
    exact_em, generalized_em, monte_carlo_em, score, BernoulliMixture, LadderTrace,
    VbBernoulliMixture,
};
use gm::GmRng;
use nalgebra::DMatrix;
use std::path::PathBuf;

/// Binary images `(N, D)`: pixel on with probability grey / 255 (one fixed draw per image set).
fn binarize(ds: &gm::data::ImageDataset, n: usize, seed: u64) -> DMatrix<f64> {
    let d = ds.image_len();
    let mut rng = GmRng::new(seed);
    let v: Vec<f64> = ds.pixels[..n * d]
        .iter()
        .map(|&p| f64::from(rng.uniform_f64() < p as f64 / 255.0))
        .collect();
    DMatrix::from_row_slice(n, d, &v)
}

fn trace_json(name: &str, t: &LadderTrace) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "log_likelihood": t.iter().map(|s| s.log_likelihood).collect::<Vec<_>>(),
        "elbo": t.iter().map(|s| s.elbo_after_m).collect::<Vec<_>>(),
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        anyhow::bail!("usage: em_ladder DATA_DIR OUT_DIR [K] [ITERS]");
    }
    let (data, out) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]));
    let k: usize = args.get(3).map_or(Ok(20), |s| s.parse())?;
    let iters: usize = args.get(4).map_or(Ok(40), |s| s.parse())?;
    std::fs::create_dir_all(&out)?;
    let train = load_split(&data, Split::Train)?;
    let test = load_split(&data, Split::Test)?;
    let (x, xt) = (
        binarize(&train, train.len(), 1),
        binarize(&test, test.len(), 2),
    );
    let start = BernoulliMixture::random(k, x.ncols(), 0.01, &mut GmRng::new(0));
    let mut runs = Vec::new();
    let clock = std::time::Instant::now();
    let mut em = start.clone();
    let t = exact_em(&mut em, &x, iters).map_err(anyhow::Error::msg)?;
    runs.push(trace_json("exact EM", &t));
    let mut mc = start.clone();
    let t = monte_carlo_em(&mut mc, &x, iters, |t| 1 + t, &mut GmRng::new(3))
        .map_err(anyhow::Error::msg)?;
    runs.push(trace_json("Monte Carlo EM (1 + t draws)", &t));
    let mut gem = start.clone();
    let t = generalized_em(&mut gem, &x, iters, 3, 50.0).map_err(anyhow::Error::msg)?;
    runs.push(trace_json("generalized EM (3 gradient steps)", &t));
    for (name, m) in [
        ("exact EM", &em),
        ("Monte Carlo EM", &mc),
        ("generalized EM", &gem),
    ] {
        let test_ll = score(m, &xt).map_err(anyhow::Error::msg)?;
        println!(
            "{name}: K = {k}, {iters} iterations: test −log p(x) = {:.2} nats",
            -test_ll
        );
    }
    // The mean-field rung: θ integrated out under Dir(1) and Beta(1.01, 1.01) priors, q(θ)
    // started around the same point.
    let mut vb = VbBernoulliMixture::around(&start, 10.0, 1.0, 1.01, 1.01);
    let t = vb.fit(&x, iters).map_err(anyhow::Error::msg)?;
    runs.push(serde_json::json!({
        "name": "variational EM (ELBO of the evidence, θ integrated out)",
        "elbo": t.iter().map(|s| s.elbo_after_m).collect::<Vec<_>>(),
    }));
    println!("the four rungs in {:.1}s", clock.elapsed().as_secs_f64());
    std::fs::write(out.join("ladder.json"), serde_json::to_string(&runs)?)?;
    // Exact EM's prototypes, ordered by weight.
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| em.weights[b].total_cmp(&em.weights[a]));
    let protos: Vec<f32> = order
        .iter()
        .flat_map(|&j| {
            em.probs
                .row(j)
                .iter()
                .map(|&p| p as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    let [c, h, w] = train.shape;
    let t = Tensor::from_vec(protos, (k, c, h, w), &Device::Cpu)?;
    gm::images::save_grid(&t, 10, &out.join("prototypes.png"))?;
    println!(
        "wrote {0}/ladder.json and {0}/prototypes.png",
        out.display()
    );
    Ok(())
}
