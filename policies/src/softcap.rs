//! Gemma 2's logit soft-capping (Gemma Team, "Gemma 2: Improving Open Language Models at a
//! Practical Size", 2024, §2 "Logit soft-capping"): `softcap(x) = c·tanh(x / c)`, which bounds the attention
//! scores (`c = 50`, before the mask and softmax) and the LM logits (`c = 30`, before any
//! temperature) smoothly inside `(−c, c)`.
//!
//! Its derivative is `1 − tanh²(x/c) = 1 − (y/c)²` of the output `y`: a backward pass needs only
//! the capped values. The host ops here serve the fused CPU attention and LM-head ops and the
//! sampling engine; [`softcap_tensor`] is dfdx's composition for every other path.

use dfdx::prelude::*;
use rayon::prelude::*;

/// `c·tanh(x / c)`.
pub fn softcap(x: f32, cap: f32) -> f32 {
    cap * (x / cap).tanh()
}

/// [`softcap`] over `xs` in place (in parallel for long buffers: the logits of a batch).
pub fn softcap_inplace(xs: &mut [f32], cap: f32) {
    const CHUNK: usize = 1 << 14;
    let f = |c: &mut [f32]| c.iter_mut().for_each(|x| *x = softcap(*x, cap));
    if xs.len() > CHUNK {
        xs.par_chunks_mut(CHUNK).for_each(f);
    } else {
        f(xs);
    }
}

/// `d ← d·(1 − (y/c)²)`: the gradient `d` with respect to the capped values `y = softcap(x)`
/// turned into the gradient with respect to `x`.
pub fn softcap_backward(d: &mut [f32], y: &[f32], cap: f32) {
    assert_eq!(d.len(), y.len(), "softcap backward: gradient and values differ in length");
    let inv = 1.0 / cap;
    d.iter_mut().zip(y).for_each(|(d, &y)| *d *= 1.0 - (y * inv) * (y * inv));
}

/// [`softcap`] as dfdx ops (any device, any shape, gradients through `tanh`); `None` passes
/// `x` through.
pub fn softcap_tensor<S: Shape, D: Device<f32>, T: Tape<f32, D>>(
    x: Tensor<S, f32, D, T>,
    cap: Option<f32>,
) -> Tensor<S, f32, D, T> {
    match cap {
        Some(c) => (x * (1.0 / c)).tanh() * c,
        None => x,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softcap_is_bounded_odd_and_near_identity_at_zero() {
        let cap = 5.0;
        for x in [-1e6f32, -40.0, -5.0, -0.3, 0.0, 1e-3, 2.0, 7.5, 1e9] {
            let y = softcap(x, cap);
            assert!(y.abs() <= cap, "{x} → {y}");
            assert_eq!(softcap(-x, cap), -y);
        }
        // tanh(u) = u − u³/3 + …: within 1e-6 of x for |x| ≪ c
        assert!((softcap(1e-2, cap) - 1e-2).abs() < 1e-6);
        assert!((softcap(50.0, cap) - cap * 10f32.tanh()).abs() < 1e-6);
    }

    #[test]
    fn backward_matches_finite_differences_and_the_dfdx_composition() {
        let cap = 3.0;
        let xs: Vec<f32> = (0..41).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let mut ys = xs.clone();
        softcap_inplace(&mut ys, cap);
        let mut d = vec![1.0f32; xs.len()];
        softcap_backward(&mut d, &ys, cap);
        for ((&x, &g), &y) in xs.iter().zip(&d).zip(&ys) {
            assert_eq!(y, softcap(x, cap));
            let h = 1e-2f64;
            let f = |x: f64| cap as f64 * (x / cap as f64).tanh();
            let fd = (f(x as f64 + h) - f(x as f64 - h)) / (2.0 * h);
            assert!((g as f64 - fd).abs() < 1e-4, "x {x}: {g} vs {fd}");
        }
        let dev = Cpu::default();
        let t = dev.tensor_from_vec(xs.clone(), (xs.len(),));
        let y = softcap_tensor(t.leaky_trace(), Some(cap));
        assert!(y.as_vec().iter().zip(&ys).all(|(a, b)| (a - b).abs() < 1e-6));
        let g = y.sum::<Rank0, _>().backward();
        assert!(g.get(&t).as_vec().iter().zip(&d).all(|(a, b)| (a - b).abs() < 1e-5));
        let same = softcap_tensor(t.clone(), None);
        assert_eq!(same.as_vec(), xs);
    }
}
