//! Data-parallel training: one rank per device, each on its shard of every batch, gradients
//! summed over ranks between backward and the optimizer step.
//!
//! - [`Collective`]: all-reduce and broadcast over ranks. [`ThreadGroup`] runs ranks as threads of
//!   one process (any device; what the tests use to check the logic), the NCCL implementation
//!   (`--features nccl`, `gm_train::nccl`) one process per GPU.
//! - [`DataParallel`]: the [`Hook`] that all-reduces a step's gradients in f32, in buckets (one
//!   collective call per [`BUCKET_ELEMS`] values, not one per tensor), and averages them; it also
//!   gathers every rank's loss for the log.
//! - [`rendezvous`]: rank 0 hands a few bytes (NCCL's unique id) to every rank over TCP.
//! - [`train_threads`]: a run with `world` ranks as threads.
//!
//! Every rank draws the same global batch of `world × accumulate × batch_size` indices and takes
//! its contiguous part; with per-sample random draws (`train.rng = "per-sample"`, set for
//! data-parallel runs) a sample's noise is keyed by its index in the global batch, so `N` ranks
//! of batch `b` compute the gradient of one rank with batch `N·b`. Rank 0 alone writes the run
//! directory (config, checkpoints, metrics, samples); it evaluates while the others wait at the
//! next step's all-reduce. Models with BatchNorm (the DCGAN) normalise over each rank's part of
//! the batch: their statistics are per rank, as PyTorch's DDP without SyncBatchNorm.

use crate::hooks::{GradAction, Hook, LossValues, StepContext};
use crate::trainer::{TrainOptions, TrainSummary, Trainer};
use crate::RunConfig;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{backprop::GradStore, DType, Tensor};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Collective operations over the ranks of a run. Every rank calls each operation in the same
/// order with tensors of the same shape.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The sum over ranks of every rank's `t` (f32), on every rank.
    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `t` on every rank.
    fn broadcast(&mut self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// What carries the collectives, for messages: `threads`, `nccl`.
    fn backend(&self) -> &'static str;
}

/// Values per all-reduce call: 4 Mi f32 (16 MiB), PyTorch DDP's bucket order of magnitude.
pub const BUCKET_ELEMS: usize = 1 << 22;

// ---------------------------------------------------------------------------------------------
// Ranks as threads

struct Slots {
    /// Each rank's contribution to the collective in progress.
    data: Vec<Option<Vec<f32>>>,
    /// Ranks arrived at the current barrier, and the barrier's generation.
    arrived: usize,
    generation: u64,
    /// Set when a rank failed: every waiting rank returns an error instead of waiting forever.
    failed: Option<String>,
}

/// The shared state of one group of thread ranks.
pub struct ThreadGroup {
    world: usize,
    slots: Mutex<Slots>,
    turn: Condvar,
}

impl ThreadGroup {
    /// `world` handles, one per rank.
    pub fn ranks(world: usize) -> Vec<ThreadComm> {
        let group = Arc::new(ThreadGroup {
            world,
            slots: Mutex::new(Slots {
                data: vec![None; world],
                arrived: 0,
                generation: 0,
                failed: None,
            }),
            turn: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadComm {
                rank,
                group: group.clone(),
            })
            .collect()
    }

    /// Marks the group failed (a rank stopped): ranks waiting now or later get an error.
    pub fn fail(&self, why: String) {
        let mut s = self.slots.lock().expect("collective lock");
        s.failed.get_or_insert(why);
        self.turn.notify_all();
    }

    /// Waits until every rank has arrived (or one failed).
    fn barrier(&self) -> Result<()> {
        let mut s = self.slots.lock().expect("collective lock");
        if let Some(why) = &s.failed {
            bail!("another rank stopped: {why}");
        }
        let gen = s.generation;
        s.arrived += 1;
        if s.arrived == self.world {
            s.arrived = 0;
            s.generation += 1;
            self.turn.notify_all();
            return Ok(());
        }
        while s.generation == gen {
            s = self.turn.wait(s).expect("collective lock");
            if let Some(why) = &s.failed {
                bail!("another rank stopped: {why}");
            }
        }
        Ok(())
    }
}

/// One rank of a [`ThreadGroup`]. Its sums add the ranks in rank order, so every rank gets the
/// same bits.
pub struct ThreadComm {
    rank: usize,
    group: Arc<ThreadGroup>,
}

impl ThreadComm {
    pub fn group(&self) -> &Arc<ThreadGroup> {
        &self.group
    }

    /// Deposits `v`, waits for every rank's, combines them with `f`, and clears the slot.
    fn exchange(
        &mut self,
        v: Option<Vec<f32>>,
        f: impl FnOnce(&[Option<Vec<f32>>]) -> Result<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        self.group.slots.lock().expect("collective lock").data[self.rank] = v;
        self.group.barrier()?;
        let out = f(&self.group.slots.lock().expect("collective lock").data);
        // Nobody deposits the next call's data before everyone has read this call's.
        self.group.barrier()?;
        self.group.slots.lock().expect("collective lock").data[self.rank] = None;
        out
    }
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl Collective for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.group.world
    }
    fn backend(&self) -> &'static str {
        "threads"
    }
    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        let v = host_f32(t)?;
        let n = v.len();
        let sum = self.exchange(Some(v), |all| {
            let mut acc = vec![0f32; n];
            for (r, s) in all.iter().enumerate() {
                let s = s.as_ref().ok_or_else(|| anyhow!("rank {r} sent nothing"))?;
                if s.len() != n {
                    bail!(
                        "all_reduce: rank {r} sent {} values, this rank {n}",
                        s.len()
                    );
                }
                for (a, b) in acc.iter_mut().zip(s) {
                    *a += b;
                }
            }
            Ok(acc)
        })?;
        Ok(Tensor::from_vec(sum, t.shape(), t.device())?.to_dtype(t.dtype())?)
    }
    fn broadcast(&mut self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mine = (self.rank == root).then(|| host_f32(t)).transpose()?;
        let v = self.exchange(mine, |all| {
            all.get(root)
                .and_then(|s| s.clone())
                .ok_or_else(|| anyhow!("broadcast: root rank {root} sent nothing"))
        })?;
        if v.len() != t.elem_count() {
            bail!(
                "broadcast: rank {root} sent {} values, rank {} expects {}",
                v.len(),
                self.rank,
                t.elem_count()
            );
        }
        Ok(Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())?)
    }
}

// ---------------------------------------------------------------------------------------------
// The hook

/// All-reduces (bucketed) and averages each step's gradients over the ranks, first among the
/// hooks, so that loss scaling and clipping see the same gradients on every rank and take the
/// same decisions; keeps every rank's loss for the log.
pub struct DataParallel {
    comm: Box<dyn Collective>,
    bucket: usize,
    /// This rank's losses of the current group (micro-batches), summed, and their count.
    loss_sum: f64,
    loss_n: usize,
    rank_losses: Vec<f64>,
}

impl DataParallel {
    pub fn new(comm: Box<dyn Collective>) -> Self {
        let world = comm.world();
        Self {
            comm,
            bucket: BUCKET_ELEMS,
            loss_sum: 0.0,
            loss_n: 0,
            rank_losses: vec![0.0; world],
        }
    }

    /// Values per all-reduce call (tests use small buckets to exercise the splitting).
    pub fn with_bucket(mut self, elems: usize) -> Self {
        self.bucket = elems.max(1);
        self
    }

    pub fn comm(&mut self) -> &mut dyn Collective {
        self.comm.as_mut()
    }
}

impl Hook for DataParallel {
    fn name(&self) -> &'static str {
        "data-parallel"
    }
    fn after_loss(&mut self, _ctx: &StepContext, loss: &LossValues) -> Result<()> {
        self.loss_sum += loss.total;
        self.loss_n += 1;
        Ok(())
    }
    fn after_backward(&mut self, ctx: &StepContext, grads: &mut GradStore) -> Result<GradAction> {
        let world = self.comm.world();
        // Every rank sends every parameter (zeros where it has no gradient), in the same order.
        let mut flat = Vec::with_capacity(ctx.vars.len());
        for (_, v) in ctx.vars {
            let g = match grads.get(v.as_tensor()) {
                Some(g) => g.to_dtype(DType::F32)?.flatten_all()?,
                None => Tensor::zeros(v.elem_count(), DType::F32, v.device())?,
            };
            flat.push(g);
        }
        // The rank losses ride in the last bucket: slot `rank` holds this rank's mean loss.
        let mut slots = vec![0f32; world];
        slots[self.comm.rank()] = (self.loss_sum / self.loss_n.max(1) as f64) as f32;
        self.loss_sum = 0.0;
        self.loss_n = 0;
        let dev = ctx
            .vars
            .first()
            .map(|(_, v)| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        flat.push(Tensor::from_vec(slots, world, &dev)?);
        let mut reduced: Vec<Tensor> = Vec::with_capacity(flat.len());
        let mut start = 0;
        while start < flat.len() {
            let mut end = start;
            let mut n = 0;
            while end < flat.len() && (end == start || n + flat[end].elem_count() <= self.bucket) {
                n += flat[end].elem_count();
                end += 1;
            }
            let refs: Vec<&Tensor> = flat[start..end].iter().collect();
            let sum = self.comm.all_reduce_sum(&Tensor::cat(&refs, 0)?)?;
            let mut off = 0;
            for t in &flat[start..end] {
                reduced.push(sum.narrow(0, off, t.elem_count())?);
                off += t.elem_count();
            }
            start = end;
        }
        let losses = reduced.pop().expect("the loss slots");
        self.rank_losses = losses
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        let inv = 1.0 / world as f64;
        for ((_, v), g) in ctx.vars.iter().zip(reduced) {
            let mean = (g * inv)?.reshape(v.shape())?.to_dtype(v.dtype())?;
            grads.insert(v.as_tensor(), mean);
        }
        Ok(GradAction::Step)
    }
    fn log(&self, rec: &mut serde_json::Value) {
        let n = self.rank_losses.len() as f64;
        rec["loss"] = serde_json::json!(self.rank_losses.iter().sum::<f64>() / n);
        rec["rank_losses"] = serde_json::json!(self.rank_losses);
    }
}

// ---------------------------------------------------------------------------------------------
// Rendezvous

/// Hands rank 0's `payload` (NCCL's 128-byte unique id) to every rank over TCP: rank 0 listens
/// on `addr` (`MASTER_ADDR:MASTER_PORT`) and answers `world − 1` connections; the other ranks
/// connect (retrying until `timeout`) and read it. Returns the payload on every rank.
pub fn rendezvous(
    addr: SocketAddr,
    rank: usize,
    world: usize,
    payload: Option<&[u8]>,
    timeout: Duration,
) -> Result<Vec<u8>> {
    const MAGIC: &[u8; 8] = b"gm-rdzv1";
    if rank == 0 {
        let payload = payload.ok_or_else(|| anyhow!("rendezvous: rank 0 needs the payload"))?;
        let listener = TcpListener::bind(addr)
            .with_context(|| format!("rendezvous: rank 0 cannot listen on {addr}"))?;
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + timeout;
        let mut served = 0;
        while served + 1 < world {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    s.set_write_timeout(Some(timeout))?;
                    s.write_all(MAGIC)?;
                    s.write_all(&(payload.len() as u32).to_le_bytes())?;
                    s.write_all(payload)?;
                    served += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!(
                            "rendezvous on {addr}: {} of {} ranks connected within {:?}",
                            served + 1,
                            world,
                            timeout
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).context(format!("rendezvous on {addr}")),
            }
        }
        return Ok(payload.to_vec());
    }
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(e).context(format!(
                    "rendezvous: rank {rank} could not reach rank 0 at {addr} within {timeout:?}"
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    stream.set_read_timeout(Some(timeout))?;
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .with_context(|| format!("rendezvous: rank {rank} reading from {addr}"))?;
    if &head[..8] != MAGIC {
        bail!("rendezvous: {addr} is not a gm rank 0 (unexpected greeting)");
    }
    let n = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes")) as usize;
    let mut payload = vec![0u8; n];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

// ---------------------------------------------------------------------------------------------
// Runs

/// Trains `cfg` with `world` ranks as threads of this process (each with its part of every
/// batch, on `opts.device`), and returns rank 0's summary. A rank that fails stops the others.
pub fn train_threads(cfg: &RunConfig, opts: &TrainOptions, world: usize) -> Result<TrainSummary> {
    if world == 0 {
        bail!("data-parallel training needs at least one rank");
    }
    let comms = ThreadGroup::ranks(world);
    let group = comms[0].group().clone();
    let results: Vec<Result<TrainSummary>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let group = group.clone();
                s.spawn(move || {
                    let rank = comm.rank();
                    let r = Trainer::new_parallel(cfg, opts, Box::new(comm)).and_then(|t| t.run());
                    if let Err(e) = &r {
                        group.fail(format!("rank {rank}: {e:#}"));
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a rank panicked"))))
            .collect()
    });
    let mut rank0 = None;
    let (mut cause, mut stopped) = (None, None);
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(s) if rank == 0 => rank0 = Some(s),
            Ok(_) => {}
            // The first real failure is the cause; the other ranks stopped because of it.
            Err(e) if format!("{e:#}").contains("another rank stopped") => {
                stopped.get_or_insert(e);
            }
            Err(e) => {
                cause.get_or_insert(e.context(format!("rank {rank} of {world}")));
            }
        }
    }
    if let Some(e) = cause.or(stopped) {
        return Err(e);
    }
    rank0.ok_or_else(|| anyhow!("rank 0 returned no summary"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A rank's gradients (per parameter) and the gathered losses.
    type RankOut = Result<(Vec<Vec<f32>>, Vec<f64>)>;

    /// Two thread ranks, buckets of 3 values over parameters of 2, 5 and 1 values (the 5 alone
    /// in its bucket): every rank ends with the mean of the ranks' gradients and both losses.
    #[test]
    fn bucketed_all_reduce_averages_gradients() -> Result<()> {
        let comms = ThreadGroup::ranks(2);
        let out: Vec<RankOut> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    s.spawn(move || -> RankOut {
                        let r = comm.rank() as f64;
                        let mut dp = DataParallel::new(Box::new(comm)).with_bucket(3);
                        let vars: Vec<(String, Var)> = [2usize, 5, 1]
                            .iter()
                            .enumerate()
                            .map(|(i, &n)| {
                                let v = Var::from_vec(vec![1f32; n], n, &Device::Cpu).unwrap();
                                (format!("p{i}"), v)
                            })
                            .collect();
                        // d/dp_i of Σ (r + 1)·(i + 1)·p_i = (r + 1)(i + 1).
                        let mut loss = Tensor::new(0f32, &Device::Cpu)?;
                        for (i, (_, v)) in vars.iter().enumerate() {
                            let w = (r + 1.0) * (i as f64 + 1.0);
                            loss = (loss + (v.as_tensor() * w)?.sum_all()?)?;
                        }
                        let ctx = StepContext {
                            step: 1,
                            group: 0,
                            vars: &vars,
                            lr: 0.0,
                            last_checkpoint: None,
                        };
                        let values = LossValues {
                            total: 10.0 * (r + 1.0),
                            parts: &[],
                        };
                        dp.after_loss(&ctx, &values)?;
                        let mut g = loss.backward()?;
                        dp.after_backward(&ctx, &mut g)?;
                        let grads = vars
                            .iter()
                            .map(|(_, v)| g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap())
                            .collect();
                        Ok((grads, dp.rank_losses.clone()))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in out {
            let (grads, losses) = r?;
            // Mean over ranks of (r + 1)(i + 1) = 1.5 (i + 1).
            for (i, g) in grads.iter().enumerate() {
                assert!(g.iter().all(|&v| v == 1.5 * (i as f32 + 1.0)), "{i}: {g:?}");
            }
            assert_eq!(losses, vec![10.0, 20.0]);
        }
        Ok(())
    }

    /// A failing rank releases the ranks waiting for it with an error naming it.
    #[test]
    fn a_failed_rank_stops_the_others() {
        let mut comms = ThreadGroup::ranks(2);
        let mut c1 = comms.pop().unwrap();
        let c0 = comms.pop().unwrap();
        let group = c0.group().clone();
        let waiter = std::thread::spawn(move || {
            c1.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu).unwrap())
        });
        std::thread::sleep(Duration::from_millis(50));
        group.fail("rank 0: loss is NaN".into());
        let err = waiter.join().unwrap().unwrap_err();
        assert!(
            format!("{err:#}").contains("rank 0: loss is NaN"),
            "{err:#}"
        );
    }

    /// Rank 0 hands its bytes to three other ranks over loopback TCP, started in any order.
    #[test]
    fn tcp_rendezvous_on_loopback() -> Result<()> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let id: Vec<u8> = (0..128u8).collect();
        let got: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4usize)
                .rev()
                .map(|rank| {
                    let id = id.clone();
                    s.spawn(move || {
                        let payload = (rank == 0).then_some(id.as_slice());
                        rendezvous(addr, rank, 4, payload, Duration::from_secs(20))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for g in got {
            assert_eq!(g?, id);
        }
        // Nobody listening: a clear error after the timeout.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let err = rendezvous(addr, 1, 2, None, Duration::from_millis(300)).unwrap_err();
        assert!(
            format!("{err:#}").contains("could not reach rank 0"),
            "{err:#}"
        );
        Ok(())
    }
}
