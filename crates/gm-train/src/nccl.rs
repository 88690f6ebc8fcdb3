//! NCCL collectives for data-parallel training on several GPUs (`--features nccl`: candle's
//! `nccl` feature, through cudarc; the NCCL library itself, `libnccl.so.2`, is loaded at run
//! time — PyPI's `nvidia-nccl-cu13` wheel provides it, see `scripts/build-cuda.sh --nccl`).
//!
//! One process per GPU. Rank 0 creates NCCL's unique id and hands it to the other ranks through
//! [`crate::parallel::rendezvous`]; then every all-reduce and broadcast runs on the GPUs, on each
//! device's stream, without a copy to the host.

use crate::parallel::{rendezvous, Collective};
use anyhow::{anyhow, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use std::net::SocketAddr;
use std::time::Duration;

/// One rank's NCCL communicator.
pub struct NcclComm {
    comm: Comm,
    rank: usize,
    world: usize,
}

impl NcclComm {
    /// Joins the communicator of `world` ranks on `device` (CUDA): rank 0 makes the unique id
    /// and serves it at `addr`; the others fetch it there.
    pub fn join(
        device: &Device,
        rank: usize,
        world: usize,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Self> {
        let cuda = device
            .as_cuda_device()
            .map_err(|_| anyhow!("NCCL needs a CUDA device (--device cuda)"))?;
        let nccl = |e| anyhow!("NCCL: {e:?} (is libnccl.so.2 on LD_LIBRARY_PATH?)");
        let own = match rank {
            0 => Some(Id::new().map_err(nccl)?),
            _ => None,
        };
        let bytes: Option<Vec<u8>> = own.map(|id| id.internal().iter().map(|&c| c as u8).collect());
        let got = rendezvous(addr, rank, world, bytes.as_deref(), timeout)?;
        let id = match own {
            Some(id) => id,
            None => {
                let mut internal = [0 as std::ffi::c_char; 128];
                if got.len() != internal.len() {
                    return Err(anyhow!(
                        "rendezvous: rank 0 sent {} bytes, an NCCL id has 128",
                        got.len()
                    ));
                }
                for (d, s) in internal.iter_mut().zip(got) {
                    *d = s as std::ffi::c_char;
                }
                Id::uninit(internal)
            }
        };
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world, id).map_err(nccl)?;
        Ok(Self { comm, rank, world })
    }
}

/// The NCCL call on a tensor's CUDA storage, as a candle op without a gradient.
struct NcclOp<'a> {
    comm: &'a Comm,
    /// `None`: all-reduce (sum); `Some(root)`: broadcast from `root`.
    root: Option<usize>,
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        match self.root {
            None => "nccl-all-reduce",
            Some(_) => "nccl-broadcast",
        }
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives take CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (lo, hi) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("NCCL: a non-contiguous tensor".into()))?;
        let dev = s.device().clone();
        let src = s.as_cuda_slice::<f32>()?.slice(lo..hi);
        let mut dst = dev.alloc_zeros::<f32>(hi - lo)?;
        let r = match self.root {
            None => self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum),
            Some(root) => self.comm.broadcast(Some(&src), &mut dst, root as i32),
        };
        r.map_err(|e| candle_core::Error::Msg(format!("NCCL {}: {e:?}", self.name())))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor> {
        let op = NcclOp {
            comm: &self.comm,
            root: None,
        };
        Ok(t.to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(&op)?
            .to_dtype(t.dtype())?)
    }
    fn broadcast(&mut self, t: &Tensor, root: usize) -> Result<Tensor> {
        let op = NcclOp {
            comm: &self.comm,
            root: Some(root),
        };
        Ok(t.to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(&op)?
            .to_dtype(t.dtype())?)
    }
}
