//! Row lookups as ops: the embedding `h[r] = wte[ids[r]] (+ wpe[pos[r]])`, `(N, C)` from
//! `N` token ids and their positions, and the selection of rows of an activation (the
//! response positions whose logits, values or rewards a stage needs).
//!
//! dfdx's gather walks a strided index per element on one thread, forward and backward, and
//! the composition adds a third pass for the sum: together ~2% of a GRPO iteration on the
//! tiny model (perf ticks). Here the forward copies rows and the backward adds rows of the
//! output gradient into the tables' gradients.

use dfdx::prelude::*;

use crate::strided::{add_rows, gather_rows, host_vec, row_major};

type A2<D, T> = Tensor<(usize, usize), f32, D, T>;
type T2<D> = Tensor<(usize, usize), f32, D>;

/// The composition through dfdx's gather (any device; the reference for the CPU op).
pub fn embed_composed<D: Device<f32>, T: Tape<f32, D>>(
    tape: T,
    wte: &T2<D>,
    wpe: Option<&T2<D>>,
    ids: &[usize],
    pos: &[usize],
) -> A2<D, T> {
    let (dev, n) = (wte.device().clone(), ids.len());
    let x: A2<D, T> = wte.clone().put_tape(tape).gather(dev.tensor_from_vec(ids.to_vec(), (n,)));
    match wpe {
        Some(wpe) => x + wpe.retaped::<T>().gather(dev.tensor_from_vec(pos.to_vec(), (n,))),
        None => x,
    }
}

/// The CPU op (same contract as [`embed_composed`]). Ids and positions must be in range
/// (the model checks the batch first); the tables are parameters, hence row-major.
pub fn embed_cpu<T: Tape<f32, Cpu>>(
    mut tape: T,
    wte: &T2<Cpu>,
    wpe: Option<&T2<Cpu>>,
    ids: &[usize],
    pos: &[usize],
) -> A2<Cpu, T> {
    let (vocab, c) = *wte.shape();
    let n = ids.len();
    assert!(ids.iter().all(|&i| i < vocab), "embed: a token id beyond the vocabulary of {vocab}");
    debug_assert!(row_major(wte) && wpe.is_none_or(row_major), "embed: a strided table");
    let table = host_vec(wte);
    let mut y = Vec::with_capacity(n * c);
    for &i in ids {
        y.extend_from_slice(&table[i * c..(i + 1) * c]);
    }
    drop(table);
    if let Some(wpe) = wpe {
        let (positions, pc) = *wpe.shape();
        assert_eq!(pc, c, "embed: position table width");
        assert_eq!(pos.len(), n, "embed: one position per token");
        assert!(pos.iter().all(|&p| p < positions), "embed: a position beyond the table's {positions}");
        let table = host_vec(wpe);
        for (row, &p) in y.chunks_mut(c).zip(pos) {
            row.iter_mut().zip(&table[p * c..(p + 1) * c]).for_each(|(y, w)| *y += w);
        }
    }
    let out = wte.device().tensor_from_vec(y, (n, c));
    if T::OWNS_TAPE {
        let (og, wte_g, wpe_g) = (out.ghost(), wte.ghost(), wpe.map(|w| w.ghost()));
        let (ids, pos) = (ids.to_vec(), pos.to_vec());
        tape.add_backward_op(move |grads| {
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            add_rows(grads.get_or_alloc_mut(&wte_g)?, &dy, &ids, c);
            if let Some(g) = &wpe_g {
                add_rows(grads.get_or_alloc_mut(g)?, &dy, &pos, c);
            }
            **grads.get_or_alloc_mut(&og)? = dy;
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// Rows `rows` of `x` through dfdx's gather (any device; the reference for the CPU op).
pub fn select_rows_composed<D: Device<f32>, T: Tape<f32, D>>(x: A2<D, T>, rows: &[usize]) -> A2<D, T> {
    let idx = x.device().tensor_from_vec(rows.to_vec(), (rows.len(),));
    x.gather(idx)
}

/// The CPU row selection (same contract as [`select_rows_composed`]): rows are copied, and
/// the backward adds each output row's gradient to its source row.
pub fn select_rows_cpu<T: Tape<f32, Cpu>>(x: A2<Cpu, T>, rows: &[usize]) -> A2<Cpu, T> {
    // a strided input becomes a row-major taped copy first (same id if already row-major)
    let x = x.contiguous();
    let (n, c) = *x.shape();
    assert!(rows.iter().all(|&r| r < n), "select_rows: a row beyond the {n} of the input");
    let (x, mut tape) = x.split_tape();
    let y = gather_rows(&host_vec(&x), rows, c);
    let out = x.device().tensor_from_vec(y, (rows.len(), c));
    if T::OWNS_TAPE {
        let (xg, og, rows) = (x.ghost(), out.ghost(), rows.to_vec());
        tape.add_backward_op(move |grads| {
            let dy: Vec<f32> = std::mem::take(&mut **grads.get_or_alloc_mut(&og)?);
            add_rows(grads.get_or_alloc_mut(&xg)?, &dy, &rows, c);
            **grads.get_or_alloc_mut(&og)? = dy;
            Ok(())
        });
    }
    out.put_tape(tape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::tests::max_rel;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Values and both tables' gradients agree with the gather composition, with repeated
    /// ids and positions (rows that collect several gradients) and without a position table.
    #[test]
    fn fused_embedding_matches_the_gather_composition() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(3);
        let (vocab, positions, c) = (11, 6, 5);
        let wte: T2<Cpu> = dev.tensor_from_vec((0..vocab * c).map(|_| rng.gen_range(-1.0..1.0)).collect(), (vocab, c));
        let wpe: T2<Cpu> =
            dev.tensor_from_vec((0..positions * c).map(|_| rng.gen_range(-1.0..1.0)).collect(), (positions, c));
        let ids = [3usize, 7, 3, 0, 10, 7, 7, 1];
        let pos = [0usize, 1, 2, 3, 0, 1, 2, 5];
        let weights = dev.tensor_from_vec((0..ids.len() * c).map(|_| rng.gen_range(-1.0..1.0)).collect(), (8, c));
        for with_positions in [true, false] {
            let p = with_positions.then_some(&wpe);
            let run = |fused: bool| {
                let tape = OwnedTape::<f32, Cpu>::default();
                let y = if fused {
                    embed_cpu(tape, &wte, p, &ids, &pos)
                } else {
                    embed_composed(tape, &wte, p, &ids, &pos)
                };
                let value = y.retaped::<NoneTape>().as_vec();
                let mut grads = (y * weights.clone()).sum::<Rank0, _>().backward();
                // a table the op did not use has no gradient: compare zeros then
                let mut grad = |t: &T2<Cpu>| grads.get_or_alloc_mut(t).unwrap().to_vec();
                (value, grad(&wte), grad(&wpe))
            };
            let (fused, composed) = (run(true), run(false));
            assert!(max_rel(&fused.0, &composed.0) < 1e-6, "values");
            assert!(max_rel(&fused.1, &composed.1) < 1e-6, "token table gradient");
            assert!(max_rel(&fused.2, &composed.2) < 1e-6, "position table gradient");
        }
    }

    /// Selected rows (with repeats, out of order) and the input's gradient agree with dfdx's
    /// gather, also for a permuted (strided) input.
    #[test]
    fn fused_row_selection_matches_gather() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(4);
        let (n, c) = (7, 4);
        let x: T2<Cpu> = dev.tensor_from_vec((0..n * c).map(|_| rng.gen_range(-1.0..1.0)).collect(), (n, c));
        let xt: T2<Cpu> = dev.tensor_from_vec((0..n * c).map(|_| rng.gen_range(-1.0..1.0)).collect(), (c, n));
        let rows = [5usize, 0, 5, 2, 6];
        let weights = dev.tensor_from_vec((0..rows.len() * c).map(|_| rng.gen_range(-1.0..1.0)).collect(), (5, c));
        for permuted in [false, true] {
            let run = |fused: bool| {
                let tape = OwnedTape::<f32, Cpu>::default();
                let input = if permuted {
                    xt.clone().put_tape(tape).permute::<_, Axes2<1, 0>>()
                } else {
                    x.clone().put_tape(tape)
                };
                let y = if fused { select_rows_cpu(input, &rows) } else { select_rows_composed(input, &rows) };
                let value = y.retaped::<NoneTape>().as_vec();
                let mut grads = (y * weights.clone()).sum::<Rank0, _>().backward();
                let g = if permuted { grads.get_or_alloc_mut(&xt) } else { grads.get_or_alloc_mut(&x) };
                (value, g.unwrap().to_vec())
            };
            let (fused, composed) = (run(true), run(false));
            assert!(max_rel(&fused.0, &composed.0) < 1e-6, "values (permuted: {permuted})");
            assert!(max_rel(&fused.1, &composed.1) < 1e-6, "gradient (permuted: {permuted})");
        }
    }
}
