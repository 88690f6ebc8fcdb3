//! Shared building blocks. Names follow PyTorch's `nn.Sequential` numbering (activations take an
//! index too), so safetensors files line up with a PyTorch `state_dict`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

/// A stack of linear layers with ReLU between them (not after the last), named
/// `0, 2, 4, …` like `nn.Sequential(Linear, ReLU, Linear, …)`.
#[derive(Clone, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
    relu_last: bool,
}

impl Mlp {
    /// `dims = [in, h1, …, out]`. With `relu_last` a ReLU follows the last layer too.
    pub fn new(dims: &[usize], relu_last: bool, vb: VarBuilder) -> Result<Self> {
        let mut layers = Vec::new();
        for (i, w) in dims.windows(2).enumerate() {
            layers.push(linear(w[0], w[1], vb.pp((2 * i).to_string()))?);
        }
        Ok(Self { layers, relu_last })
    }

    /// Index the next module would get in the PyTorch `Sequential`.
    pub fn next_index(&self) -> usize {
        2 * self.layers.len() - usize::from(!self.relu_last)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let n = self.layers.len();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < n || self.relu_last {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}
