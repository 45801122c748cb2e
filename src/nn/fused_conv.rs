//! A CPU convolution as one custom op: im2col and a matrix product forward, and backward the
//! weight's gradient (`dY · colsᵀ`) and the input's (col2im of `Wᵀ · dY`) computed inside the op.
//!
//! [`super::conv::Conv`]'s CPU path records the gathered columns (k² times the input) as a graph
//! node; backward, candle then allocates their gradient, adds it into a zeroed buffer and keeps
//! them alive until then. In NDP-Net's training step those column gradients were most of the time
//! spent in gradient sums (`perf`). Here the columns live only inside the forward and are gathered
//! again in the backward.
use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};

use crate::nn::cpu_op_input;
use crate::nn::im2col::{Col2Im, Im2Col};

/// `y = W · im2col(x)` for `x` `[B, C, H, W]` and `W` `[O, C·k²]` (PyTorch's flattened layout).
#[derive(Clone, Copy, Debug)]
pub struct ConvOp {
    pub gather: Im2Col,
}

impl ConvOp {
    /// `[B, C·k², Ho·Wo]` columns of a detached `x`.
    fn columns(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.detach().contiguous()?.apply_op1_no_bwd(&self.gather)
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "fused-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let device = Device::Cpu;
        let x = Tensor::from_vec(
            cpu_op_input(s1, l1, "fused convolution input")?.to_vec(),
            l1.shape(),
            &device,
        )?;
        let w = Tensor::from_vec(
            cpu_op_input(s2, l2, "fused convolution weight")?.to_vec(),
            l2.shape(),
            &device,
        )?;
        let (b, _, _, _) = x.dims4()?;
        let (ho, wo) = self.gather.out_size();
        let y = w.broadcast_matmul(&self.columns(&x)?)?;
        let out = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(out), Shape::from((b, w.dim(0)?, ho, wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, o, ho, wo) = grad.dims4()?;
        let dy = grad.detach().contiguous()?.reshape((b, o, ho * wo))?;
        let cols = self.columns(x)?;
        let dw = dy.matmul(&cols.transpose(1, 2)?)?.sum(0)?;
        let dcols = w.detach().t()?.broadcast_matmul(&dy)?.contiguous()?;
        let dx = dcols.apply_op1_no_bwd(&Col2Im(self.gather))?;
        Ok((Some(dx), Some(dw)))
    }
}
