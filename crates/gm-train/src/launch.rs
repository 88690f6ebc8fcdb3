//! How `gm train` runs: one process, `--ranks N` ranks, or one rank of a torchrun-style launch.
//!
//! - No `--ranks` and no `WORLD_SIZE` in the environment: a plain run.
//! - `--ranks N` on the CPU: `N` ranks as threads of this process ([`train_threads`]): a check
//!   of the data-parallel logic (the ranks share the cores, so it is no faster).
//! - `--ranks N` on CUDA (a build with `--features nccl`): `N` processes of this program, one per
//!   GPU (`cuda:0` … `cuda:N−1`), with NCCL between them; this process waits for them, and a rank
//!   that fails stops the others.
//! - `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT` set (torchrun's names, or
//!   another launcher's on several nodes): this process is one rank, on `cuda:LOCAL_RANK`, with
//!   NCCL; rank 0 serves NCCL's unique id at `MASTER_ADDR:MASTER_PORT`.

use crate::parallel::train_threads;
use crate::trainer::{TrainOptions, TrainSummary};
use crate::RunConfig;
use anyhow::{anyhow, bail, Context, Result};
use std::net::SocketAddr;

/// This process's place in a torchrun-style launch, from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world: usize,
    pub addr: SocketAddr,
}

/// Reads `WORLD_SIZE`, `RANK`, `LOCAL_RANK` (default `RANK`), `MASTER_ADDR` (default
/// 127.0.0.1) and `MASTER_PORT` (default 29500) through `get`; `None` without `WORLD_SIZE`.
/// Errors name the variable and its value.
pub fn rank_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<RankEnv>> {
    let Some(world) = get("WORLD_SIZE") else {
        return Ok(None);
    };
    let num = |k: &str, v: String| -> Result<usize> {
        v.trim()
            .parse()
            .map_err(|_| anyhow!("{k} = '{v}' is not a number"))
    };
    let world = num("WORLD_SIZE", world)?;
    let rank = num(
        "RANK",
        get("RANK").ok_or_else(|| anyhow!("WORLD_SIZE is set but RANK is not"))?,
    )?;
    let local_rank = match get("LOCAL_RANK") {
        Some(v) => num("LOCAL_RANK", v)?,
        None => rank,
    };
    if world == 0 || rank >= world {
        bail!("RANK = {rank} must be below WORLD_SIZE = {world}");
    }
    let host = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
    let port = get("MASTER_PORT").unwrap_or_else(|| "29500".into());
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&format!("{host}:{port}"))
        .with_context(|| format!("MASTER_ADDR:MASTER_PORT = {host}:{port}"))?
        .next()
        .ok_or_else(|| anyhow!("MASTER_ADDR:MASTER_PORT = {host}:{port} has no address"))?;
    Ok(Some(RankEnv {
        rank,
        local_rank,
        world,
        addr,
    }))
}

/// Trains as the launch asks (see the module). `ranks` is `--ranks`. Returns the summary for
/// this process to print: `None` where another process (rank 0) reports the run.
pub fn train(
    cfg: &RunConfig,
    opts: &TrainOptions,
    ranks: Option<usize>,
) -> Result<Option<TrainSummary>> {
    if let Some(env) = rank_env(|k| std::env::var(k).ok())? {
        if ranks.is_some() {
            bail!("--ranks starts its own ranks; it cannot be used inside a launch that sets WORLD_SIZE");
        }
        return train_rank(cfg, opts, &env);
    }
    match ranks {
        None | Some(1) => crate::trainer::train(cfg, opts).map(Some),
        Some(0) => bail!("--ranks must be at least 1"),
        Some(n) if opts.device.is_cpu() => train_threads(cfg, opts, n).map(Some),
        Some(n) if opts.device.is_cuda() => spawn_ranks(n).map(|_| None),
        Some(_) => bail!("--ranks needs the CPU (ranks as threads) or CUDA with NCCL"),
    }
}

#[cfg(feature = "nccl")]
fn train_rank(cfg: &RunConfig, opts: &TrainOptions, env: &RankEnv) -> Result<Option<TrainSummary>> {
    let device = candle_core::Device::new_cuda(env.local_rank)
        .with_context(|| format!("rank {}: cuda:{}", env.rank, env.local_rank))?;
    let comm = crate::nccl::NcclComm::join(
        &device,
        env.rank,
        env.world,
        env.addr,
        std::time::Duration::from_secs(300),
    )?;
    let opts = TrainOptions {
        device,
        progress: opts.progress && env.rank == 0,
        ..opts.clone()
    };
    let s = crate::trainer::Trainer::new_parallel(cfg, &opts, Box::new(comm))?.run()?;
    Ok((env.rank == 0).then_some(s))
}

#[cfg(not(feature = "nccl"))]
fn train_rank(
    _cfg: &RunConfig,
    _opts: &TrainOptions,
    env: &RankEnv,
) -> Result<Option<TrainSummary>> {
    bail!(
        "WORLD_SIZE = {} is set (a torchrun-style launch), but this gm was built without NCCL: build it with scripts/build-cuda.sh --nccl (cargo --features nccl)",
        env.world
    )
}

/// Starts `n` ranks of this program (the same arguments without `--ranks`) on `cuda:0` …
/// `cuda:n−1`, with a free local port for the rendezvous, and waits for them (rank 0 prints the
/// run's summary).
fn spawn_ranks(n: usize) -> Result<()> {
    if !cfg!(feature = "nccl") {
        bail!("--ranks {n} on CUDA needs NCCL: build gm with scripts/build-cuda.sh --nccl (cargo --features nccl)");
    }
    let exe = std::env::current_exe().context("the gm executable")?;
    let args = strip_ranks(std::env::args().skip(1));
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut children = Vec::with_capacity(n);
    for rank in 0..n {
        let child = std::process::Command::new(&exe)
            .args(&args)
            .env("WORLD_SIZE", n.to_string())
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push(child);
    }
    let mut failed = None;
    // Wait in turn; once one rank fails, stop the rest (they would wait on it forever).
    for rank in 0..n {
        let status = children[rank].wait()?;
        if !status.success() && failed.is_none() {
            failed = Some(format!("rank {rank} exited with {status}"));
            for c in children.iter_mut().skip(rank + 1) {
                let _ = c.kill();
            }
        }
    }
    match failed {
        Some(why) => bail!("{why}; the other ranks were stopped"),
        None => Ok(()),
    }
}

/// The command-line arguments without `--ranks N` / `--ranks=N`.
pub fn strip_ranks(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if a == "--ranks" {
            skip = true;
        } else if !a.starts_with("--ranks=") {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn torchrun_variables() -> Result<()> {
        assert_eq!(rank_env(env(&[]))?, None);
        let e = rank_env(env(&[("WORLD_SIZE", "4"), ("RANK", "2")]))?.unwrap();
        assert_eq!((e.rank, e.local_rank, e.world), (2, 2, 4));
        assert_eq!(e.addr.to_string(), "127.0.0.1:29500");
        let e = rank_env(env(&[
            ("WORLD_SIZE", "16"),
            ("RANK", "9"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "4000"),
        ]))?
        .unwrap();
        assert_eq!((e.rank, e.local_rank, e.world), (9, 1, 16));
        assert_eq!(e.addr.port(), 4000);
        let err = |p: &[(&str, &str)]| format!("{:#}", rank_env(env(p)).unwrap_err());
        assert!(err(&[("WORLD_SIZE", "two")]).contains("WORLD_SIZE = 'two'"));
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK is not"));
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "2")]).contains("below WORLD_SIZE"));
        assert!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "x")])
                .contains("MASTER_ADDR:MASTER_PORT")
        );
        Ok(())
    }

    #[test]
    fn ranks_are_stripped_from_the_children_arguments() {
        let a = |v: &[&str]| strip_ranks(v.iter().map(|s| s.to_string()));
        assert_eq!(
            a(&["train", "--ranks", "4", "--config", "x.toml"]),
            vec!["train", "--config", "x.toml"]
        );
        assert_eq!(
            a(&["train", "--ranks=2", "--quiet"]),
            vec!["train", "--quiet"]
        );
    }
}
