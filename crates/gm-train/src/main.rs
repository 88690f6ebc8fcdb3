//! `gm`: train, sample, evaluate and fetch data from the command line.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod cli;

#[derive(Parser, Debug)]
#[command(name = "gm", version, about = "Deep generative models on Candle")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Train a model from a TOML preset (or resume a run).
    Train(cli::train::TrainArgs),
    /// Write a PNG grid of samples.
    Sample(cli::sample::SampleArgs),
    /// Evaluate a checkpoint on a split; prints one JSON object.
    Eval(cli::eval::EvalArgs),
    /// Per-image −log p(x) of a density model to a CSV; with --ood-data-dir, the AUROC of telling
    /// a second data set from the first by likelihood and by two corrected scores (JSON).
    Score(cli::score::ScoreArgs),
    /// One table over trained runs (likelihood, fid_mnist, KID, precision/recall, mode coverage,
    /// speed; seeds grouped) and a labelled montage of their samples.
    Compare(cli::compare::CompareArgs),
    /// Time the train step (forward, backward, Adam) of a preset on random data; prints JSON.
    Bench(cli::bench::BenchArgs),
    /// Check that a device computes what gm's CPU kernels compute, for every model family: one
    /// training step (loss, gradients, Adam) and one sampling pass from the same weights, batch
    /// and noise, plus a checkpoint round trip; prints a table, exits non-zero on any failure.
    /// `--device cpu` compares gm's kernels with the portable path (what CUDA and Metal run).
    Doctor(cli::doctor::DoctorArgs),
    /// Write a trained run as a model folder a hub can host (model.safetensors, config.json, a
    /// model card, samples.png); --checkpoint DIR reads it.
    Export(cli::export::ExportArgs),
    /// Download a data set into gm's cache and print its folder.
    Fetch(cli::fetch::FetchArgs),
    /// Convert a diffusers model folder (UNet2DModel + scheduler) into a gm DDPM checkpoint;
    /// `--checkpoint DIR` also reads such a folder directly.
    Import(cli::import::ImportArgs),
}

fn run() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Train(a) => cli::train::run(a),
        Cmd::Sample(a) => cli::sample::run(a),
        Cmd::Eval(a) => cli::eval::run(a),
        Cmd::Score(a) => cli::score::run(a),
        Cmd::Bench(a) => cli::bench::run(a),
        Cmd::Compare(a) => cli::compare::run(a),
        Cmd::Import(a) => cli::import::run(a),
        Cmd::Doctor(a) => cli::doctor::run(a),
        Cmd::Fetch(a) => cli::fetch::run(a),
        Cmd::Export(a) => cli::export::run(a),
    }
}

#[global_allocator]
static ALLOC: gm_train::alloc::Counting = gm_train::alloc::Counting;

fn main() {
    gm_train::alloc::mark_installed();
    gm_core::keep_freed_memory();
    if let Err(e) = run() {
        eprintln!("gm: error: {e:#}");
        std::process::exit(1);
    }
}
