//! Gradient checkpointing: a block keeps its inputs and outputs, not its activations, and
//! computes its forward again in the backward pass.
//!
//! Under [`Enabled`], [`block`] runs a network block without keeping the graph of its inside:
//! the block's outputs hang on its inputs through one candle op whose backward recomputes the
//! block (with the graph this time), takes the gradient of `Σ_k ⟨outputs_k, grad_k⟩` with respect
//! to the block's inputs and parameters, hands the inputs' part back to candle and sets the
//! parameters' part aside. [`backward`] is `loss.backward()` plus those set-aside gradients: the
//! trainer calls it, and a plain `backward()` over a checkpointed block fails with a message that
//! says so. Peak memory drops from every activation of every block to one block's activations
//! plus the blocks' inputs and outputs; the step costs one more forward of each block.
//!
//! A block must compute the same function when run again: no random draws inside (UNet blocks
//! and PixelCNN layers draw none). Outside [`Enabled`] (evaluation, sampling) [`block`] is the
//! plain call. Mixed precision carries over: the recompute runs under the autocast setting of the
//! forward.

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, MetalStorage, Result, Shape,
    Storage, Tensor, Var,
};
use std::cell::{Cell, RefCell};
use std::sync::{Arc, Mutex};

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(false) };
    /// The parameters' gradients recomputed blocks set aside during the running [`backward`]
    /// (`None` outside it).
    static SET_ASIDE: RefCell<Option<GradStore>> = const { RefCell::new(None) };
    static RECOMPUTED: Cell<u64> = const { Cell::new(0) };
}

/// Gradient checkpointing on (or off) for this thread while the guard lives.
pub struct Enabled {
    previous: bool,
}

impl Enabled {
    pub fn enter(on: bool) -> Self {
        Self {
            previous: ENABLED.with(|e| e.replace(on)),
        }
    }
}

impl Drop for Enabled {
    fn drop(&mut self) {
        ENABLED.with(|e| e.set(self.previous));
    }
}

/// Whether [`block`] checkpoints on this thread.
pub fn enabled() -> bool {
    ENABLED.with(|e| e.get())
}

/// Blocks recomputed in backward passes on this thread since the last [`reset_recomputed`].
pub fn recomputed() -> u64 {
    RECOMPUTED.with(|r| r.get())
}

pub fn reset_recomputed() {
    RECOMPUTED.with(|r| r.set(0));
}

/// The function a block computes: its inputs to its outputs.
pub type BlockFn = dyn Fn(&[Tensor]) -> Result<Vec<Tensor>> + Send + Sync;

/// Runs the block `f` on `inputs` (one or two tensors; anything else it needs, labels say, it
/// captures). Checkpointed under [`Enabled`], the plain `f(inputs)` otherwise. Every output must
/// have the dtype and device of the first.
///
/// A block whose inputs all carry no gradient (the first layer, reading the images) runs plain
/// too: candle ties an op into the graph through its inputs only, so the block's parameters
/// would get no gradient.
pub fn block(
    inputs: &[&Tensor],
    f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>> + Send + Sync + 'static,
) -> Result<Vec<Tensor>> {
    if !enabled() || !inputs.iter().any(|t| t.track_op()) {
        let owned: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
        return f(&owned);
    }
    // (No input at all took the plain path above.)
    if inputs.len() > 2 {
        candle_core::bail!(
            "a checkpointed block takes one or two input tensors, got {}",
            inputs.len()
        );
    }
    // The forward without a graph to keep: the block's inside is freed as soon as it is done.
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let outs = f(&detached)?;
    let shapes: Vec<Shape> = outs.iter().map(|o| o.shape().clone()).collect();
    let flat: Vec<Tensor> = outs
        .iter()
        .map(|o| o.detach().flatten_all())
        .collect::<Result<_>>()?;
    let joined = match flat.as_slice() {
        [one] => one.contiguous()?,
        many => Tensor::cat(many, 0)?,
    };
    let op = Recompute {
        values: Held::new(joined),
        shapes: shapes.clone(),
        f: Arc::new(f),
        autocast: crate::precision::autocast(),
    };
    let joined = match inputs {
        [a] => a.apply_op1_arc(Arc::new(Box::new(op)))?,
        [a, b] => a.apply_op2_arc(b, Arc::new(Box::new(op)))?,
        _ => unreachable!("checked above"),
    };
    split(&joined, &shapes)
}

/// [`block`] for a block of one output.
pub fn block1(
    inputs: &[&Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let mut outs = block(inputs, move |x| Ok(vec![f(x)?]))?;
    Ok(outs.remove(0))
}

/// The gradients of `loss` with respect to every variable it depends on, checkpointed blocks'
/// parameters included: `loss.backward()` plus what the recomputed blocks set aside, and
/// nothing else.
///
/// candle's backward also leaves a gradient for every untracked tensor an op read (the noise
/// of a loss, a weight vector, a constant): it is never used, and one computed from a tracked
/// operand (`w · loss_i` gives `w` the gradient `loss_i`) hangs on to the whole forward graph
/// for as long as the gradients live. Those are dropped here, and the variables' gradients are
/// detached (unless second-order gradients are on), so the graph goes when the loss does.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    let outer = SET_ASIDE.with(|s| s.replace(Some(GradStore::default())));
    let grads = loss.backward();
    let set_aside = SET_ASIDE.with(|s| s.replace(outer));
    let mut all = grads?;
    let mut grads = GradStore::default();
    for v in loss.sorted_nodes().into_iter().filter(|n| n.is_variable()) {
        if let Some(g) = all.remove(v) {
            // Candle's own ops (the portable path) leave a parameter's gradient on its graph.
            grads.insert(v, crate::kernels::for_grad(&g));
        }
    }
    // The blocks' parameters (their own backward kept nothing else).
    if let Some(extra) = set_aside {
        grads.extend(extra)?;
    }
    Ok(grads)
}

/// `joined` (the outputs flattened end to end) cut back into the outputs.
fn split(joined: &Tensor, shapes: &[Shape]) -> Result<Vec<Tensor>> {
    if let [one] = shapes {
        return Ok(vec![joined.reshape(one)?]);
    }
    let mut at = 0;
    shapes
        .iter()
        .map(|s| {
            let n = s.elem_count();
            let part = joined.narrow(0, at, n)?.reshape(s)?;
            at += n;
            Ok(part)
        })
        .collect()
}

/// A tensor computed before an op runs, which the op's forward hands out as its result.
struct Held(Mutex<Option<Tensor>>);

impl Held {
    fn new(t: Tensor) -> Self {
        Self(Mutex::new(Some(t)))
    }

    /// The tensor, taken once.
    fn take(&self) -> Result<Tensor> {
        let mut v = self.0.lock().map_err(|_| {
            candle_core::Error::Msg("a gradient-checkpoint op's held tensor: lock poisoned".into())
        })?;
        v.take().ok_or_else(|| {
            candle_core::Error::Msg("a gradient-checkpoint op's forward ran twice".into())
        })
    }

    /// Its storage, copied out of the tensor that holds it.
    fn stored<S>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
    {
        let t = self.take()?;
        let (storage, layout) = t.storage_and_layout();
        let s = pick(&storage).ok_or_else(|| {
            candle_core::Error::Msg(
                "a gradient-checkpoint op's held tensor is on another device".into(),
            )
        })?;
        Ok((s.try_clone(layout)?, layout.shape().clone()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        self.stored(|s| match s {
            Storage::Cpu(c) => Some(c),
            _ => None,
        })
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        self.stored(|s| match s {
            Storage::Cuda(c) => Some(c),
            _ => None,
        })
    }

    fn metal(&self) -> Result<(MetalStorage, Shape)> {
        self.stored(|s| match s {
            Storage::Metal(c) => Some(c),
            _ => None,
        })
    }
}

/// The op a checkpointed block leaves in the graph.
struct Recompute {
    /// The outputs computed in the forward, flattened and joined.
    values: Held,
    shapes: Vec<Shape>,
    f: Arc<BlockFn>,
    autocast: Option<DType>,
}

impl Recompute {
    /// The inputs' gradients; the parameters' go to the running [`backward`].
    fn grads(&self, inputs: &[&Tensor], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let outside = SET_ASIDE.with(|s| s.borrow().is_none());
        if outside {
            candle_core::bail!(
                "a gradient-checkpointed block needs gm_core::grad_checkpoint::backward(&loss) \
                 (a plain loss.backward() would lose its parameters' gradients)"
            );
        }
        // Inputs that carry gradients become leaves of the block's own graph.
        let mut leaves = Vec::with_capacity(inputs.len());
        let mut tensors = Vec::with_capacity(inputs.len());
        for t in inputs {
            if t.track_op() {
                let v = Var::from_tensor(&t.detach())?;
                tensors.push(v.as_tensor().clone());
                leaves.push(Some(v));
            } else {
                tensors.push(t.detach());
                leaves.push(None);
            }
        }
        let outs = {
            let _ac = crate::precision::Autocast::enter(self.autocast);
            let _plain = Enabled::enter(false);
            (self.f)(&tensors)?
        };
        RECOMPUTED.with(|r| r.set(r.get() + 1));
        let grads = split(grad, &self.shapes)?;
        let mut surrogate: Option<Tensor> = None;
        for (o, g) in outs.iter().zip(&grads) {
            let term = Seed::apply(o, g)?;
            surrogate = Some(match surrogate {
                None => term,
                Some(s) => (s + term)?,
            });
        }
        let surrogate = surrogate.expect("a block has an output");
        let mut inner = backward(&surrogate)?;
        let input_grads = leaves
            .iter()
            .map(|l| l.as_ref().and_then(|v| inner.remove(v.as_tensor())))
            .collect();
        SET_ASIDE.with(|s| -> Result<()> {
            match s.borrow_mut().as_mut() {
                Some(store) => store.extend(inner),
                None => Ok(()),
            }
        })?;
        Ok(input_grads)
    }
}

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "grad-checkpoint"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.values.cpu()
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.values.cuda()
    }
    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.values.metal()
    }
    fn bwd(&self, a: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.grads(&[a], grad)?.remove(0))
    }
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "grad-checkpoint"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.values.cpu()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.values.cuda()
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.values.metal()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(&[a, b], grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

/// `0 · Σ(output)` whose backward hands the output the gradient `grad`: the recomputed
/// block's backward starts from the gradient its output got in the outer backward, without the
/// passes over the output a surrogate `Σ output · grad` would cost (its product, the gradient
/// of `grad`, the broadcast of the sum's gradient).
struct Seed {
    zero: Held,
    grad: Tensor,
}

impl Seed {
    fn apply(output: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let zero = Tensor::zeros((), output.dtype(), output.device())?;
        output.apply_op1(Seed {
            zero: Held::new(zero),
            grad: grad.clone(),
        })
    }
}

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "grad-checkpoint-seed"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.zero.cpu()
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.zero.cuda()
    }
    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.zero.metal()
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, _grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A residual tanh MLP as three blocks (the middle one with two inputs and two outputs),
    /// its loss and the variables it depends on.
    struct Net {
        w: Vec<Var>,
        x: Var,
        scale: Var,
        /// An input that carries no gradient.
        c: Tensor,
    }

    impl Net {
        fn new(dtype: DType) -> Result<Self> {
            let dev = Device::Cpu;
            let v = |seed: u64, shape: (usize, usize)| -> Result<Var> {
                let n = shape.0 * shape.1;
                let vals: Vec<f64> = (0..n)
                    .map(|i| ((i as u64 * 7919 + seed * 104_729) % 1000) as f64 / 1000.0 - 0.5)
                    .collect();
                Var::from_tensor(&Tensor::from_vec(vals, shape, &dev)?.to_dtype(dtype)?)
            };
            Ok(Self {
                w: vec![v(1, (8, 8))?, v(2, (8, 8))?, v(3, (8, 8))?],
                x: v(4, (5, 8))?,
                scale: v(5, (1, 8))?,
                c: v(6, (5, 8))?.as_tensor().detach(),
            })
        }

        fn loss(&self) -> Result<Tensor> {
            let w: Vec<Tensor> = self.w.iter().map(|v| v.as_tensor().clone()).collect();
            let (w0, w1, w2) = (w[0].clone(), w[1].clone(), w[2].clone());
            let s = self.scale.as_tensor().clone();
            let h = block1(&[self.x.as_tensor()], move |i| {
                let h = (&i[0] + crate::precision::matmul(&i[0], &w0)?.tanh()?)?;
                &h + crate::precision::matmul(&h, &w0)?.tanh()?
            })?;
            // Two inputs (one without gradient), two outputs.
            let mut two = block(&[&h, &self.c], move |i| {
                let a = (crate::precision::matmul(&i[0], &w1)?.tanh()? + &i[1])?;
                let b = i[0].broadcast_mul(&s)?;
                Ok(vec![a, b])
            })?;
            let (a, b) = (two.remove(0), two.remove(0));
            let out = block1(&[&a], move |i| crate::precision::matmul(&i[0], &w2)?.tanh())?;
            ((out.sqr()?.sum_all()? + (b * 0.5)?.sum_all()?)? + a.sum_all()?)?.to_dtype(DType::F64)
        }

        fn vars(&self) -> Vec<&Tensor> {
            let mut v: Vec<&Tensor> = self.w.iter().map(|v| v.as_tensor()).collect();
            v.push(self.x.as_tensor());
            v.push(self.scale.as_tensor());
            v
        }
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        let a = a.to_dtype(DType::F64)?;
        let b = b.to_dtype(DType::F64)?;
        let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let s = a.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-30);
        Ok(d / s)
    }

    fn compare(dtype: DType, autocast: Option<DType>, tol: f64) -> Result<()> {
        let net = Net::new(dtype)?;
        let _ac = crate::precision::Autocast::enter(autocast);
        let plain_loss = net.loss()?;
        let plain = plain_loss.backward()?;
        let _on = Enabled::enter(true);
        reset_recomputed();
        let ck_loss = net.loss()?;
        // The checkpointed graph holds each block as one node (and the cuts of the
        // two-output block's outputs) instead of every op inside.
        let (n_plain, n_ck) = (
            plain_loss.sorted_nodes().len(),
            ck_loss.sorted_nodes().len(),
        );
        assert!(
            n_ck + 6 <= n_plain,
            "{dtype:?}: {n_ck} graph nodes checkpointed vs {n_plain} plain"
        );
        assert_eq!(
            plain_loss.to_scalar::<f64>()?,
            ck_loss.to_scalar::<f64>()?,
            "{dtype:?}: the checkpointed forward computes the same loss"
        );
        let ck = backward(&ck_loss)?;
        assert_eq!(recomputed(), 3, "each block recomputed once");
        for (i, v) in net.vars().into_iter().enumerate() {
            let (p, c) = (plain.get(v).expect("plain grad"), ck.get(v));
            let c = c.unwrap_or_else(|| panic!("{dtype:?}: variable {i} got no gradient"));
            let d = max_rel_diff(p, c)?;
            assert!(
                d <= tol,
                "{dtype:?} {autocast:?}: variable {i} off by {d:e}"
            );
        }
        Ok(())
    }

    #[test]
    fn checkpointed_gradients_equal_the_plain_ones() -> Result<()> {
        // Same ops in the same order: equal to the last bit in f64 and f32.
        compare(DType::F64, None, 0.0)?;
        compare(DType::F32, None, 0.0)?;
        // The recompute runs under the forward's autocast (bf16 products).
        compare(DType::F32, Some(DType::BF16), 0.0)
    }

    #[test]
    fn a_block_on_inputs_without_gradient_still_trains_its_parameters() -> Result<()> {
        let net = Net::new(DType::F32)?;
        let w = net.w[0].as_tensor().clone();
        let loss = |on: bool| -> Result<Tensor> {
            let _on = Enabled::enter(on);
            let w = w.clone();
            block1(&[&net.c], move |i| {
                crate::precision::matmul(&i[0], &w)?.tanh()
            })?
            .sqr()?
            .sum_all()
        };
        let plain = backward(&loss(false)?)?;
        let ck = backward(&loss(true)?)?;
        let (p, c) = (
            plain.get(&w).expect("plain"),
            ck.get(&w).expect("checkpointed"),
        );
        assert_eq!(max_rel_diff(p, c)?, 0.0);
        Ok(())
    }

    /// gm's backward hands back the variables' gradients only, none of them holding a graph —
    /// through gm's kernels (convolution, GroupNorm, bias + activation, gated tanh, matmul) or,
    /// with `GM_KERNELS=portable`, candle's ops — and drops the gradient candle gives an
    /// untracked weight on a per-image loss, which holds the whole graph.
    #[test]
    fn backward_keeps_only_the_variables_gradients_and_no_graph() -> Result<()> {
        use crate::kernels::{conv, norm, ops};
        let dev = Device::Cpu;
        let var = |shape: &[usize], seed: u64| -> Result<Var> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i as u64 * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            Var::from_tensor(&Tensor::from_vec(v, shape, &dev)?)
        };
        let x = var(&[2, 4, 5, 5], 1)?;
        let w = var(&[8, 4, 3, 3], 2)?;
        let (gamma, beta, bias) = (var(&[8], 3)?, var(&[8], 4)?, var(&[4], 5)?);
        let m = var(&[25, 25], 6)?;
        let p = conv::Conv2dParams {
            padding: [1, 1],
            ..Default::default()
        };
        let h = conv::conv2d(x.as_tensor(), w.as_tensor(), p)?;
        let h = norm::group_norm(&h, gamma.as_tensor(), beta.as_tensor(), 2, 1e-5, true)?;
        let h = ops::bias_act(&ops::gated_tanh(&h)?, bias.as_tensor(), ops::Act::Relu)?;
        let rows = crate::precision::matmul(&h.reshape((8, 25))?, m.as_tensor())?
            .sqr()?
            .sum_keepdim(1)?;
        let weights = Tensor::ones((8, 1), DType::F32, &dev)?;
        let loss = (rows * &weights)?.sum_all()?;
        let candle = loss.backward()?;
        assert!(
            candle.get(&weights).is_some_and(|g| g.track_op()),
            "the test needs candle's gradient of an untracked weight to hold the graph"
        );
        let g = backward(&loss)?;
        let vars = [&x, &w, &gamma, &beta, &bias, &m];
        assert_eq!(
            g.get_ids().count(),
            vars.len(),
            "the variables' gradients only"
        );
        let native = !crate::portable_kernels();
        for (i, v) in vars.iter().enumerate() {
            let gv = g.get(v.as_tensor()).expect("a variable's gradient");
            assert!(!gv.track_op(), "variable {i}'s gradient holds a graph");
            let c = candle.get(v.as_tensor()).expect("candle's gradient");
            assert_eq!(max_rel_diff(gv, c)?, 0.0, "variable {i}");
            // gm's kernels compute them without one already, during the backward (where the
            // peak is); candle's ops on the portable path do not.
            assert!(
                !(native && c.track_op()),
                "gm's kernels gave variable {i} a gradient with a graph"
            );
        }
        eprintln!(
            "checked the {} path",
            if native {
                "native kernels'"
            } else {
                "portable"
            }
        );
        Ok(())
    }

    #[test]
    fn a_plain_backward_over_a_checkpointed_block_fails_clearly() -> Result<()> {
        let net = Net::new(DType::F32)?;
        let _on = Enabled::enter(true);
        let err = net.loss()?.backward().expect_err("must not lose gradients");
        assert!(
            err.to_string().contains("grad_checkpoint::backward"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn outside_enabled_a_block_is_the_plain_call() -> Result<()> {
        let net = Net::new(DType::F32)?;
        let loss = net.loss()?;
        // No checkpoint op: a plain backward works and nothing is recomputed.
        reset_recomputed();
        let g = loss.backward()?;
        assert!(g.get(net.w[0].as_tensor()).is_some());
        assert_eq!(recomputed(), 0);
        Ok(())
    }
}
