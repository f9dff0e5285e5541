//! The scalar head read at chosen positions, and the presets' agreement with the workload.

mod common;

use common::*;
use dfdx::prelude::*;
use rlhf::bench::Workload;
use rlhf_policies::{Batch, CausalLm, ModelConfig, ScalarHead};

#[test]
fn presets_are_the_workload_shapes() {
    let w = Workload::from_file(&shared().join("peers/workload.json")).unwrap();
    assert_eq!(w.model_config("tiny").unwrap(), ModelConfig::tiny());
    assert_eq!(w.model_config("small").unwrap(), ModelConfig::small());
    // parameter counts from shared/peers/README.md: 4.27 M and 12.32 M
    let dev = Cpu::default();
    let tiny = CausalLm::new(ModelConfig::tiny(), &dev, 0).unwrap().num_params();
    let small = CausalLm::new(ModelConfig::small(), &dev, 0).unwrap().num_params();
    assert_eq!((tiny as f64 / 1e4).round() / 100.0, 4.27);
    assert_eq!((small as f64 / 1e4).round() / 100.0, 12.32);
}

#[test]
fn scalar_head_reads_the_last_real_token_under_any_padding() {
    let dev = Cpu::default();
    let mut cfg = ModelConfig::gpt2_preset(30, 16, 2, 2, 32);
    if let ModelConfig::Gpt2(c) = &mut cfg {
        c.initializer_range = 0.2;
    }
    let m = CausalLm::new(cfg, &dev, 1).unwrap();
    let head = ScalarHead::new(&dev, 16, 0.5, 2);
    let rows = vec![vec![3u32, 4, 5, 6, 7], vec![8, 9], vec![10, 11, 12]];
    let score = |batch: &Batch| {
        let rows: Vec<usize> =
            batch.last_real_index().iter().enumerate().map(|(r, j)| r * batch.t + j.unwrap()).collect();
        head.read_at(m.forward_hidden(batch, NoneTape).unwrap(), &rows).unwrap().as_vec()
    };
    let left = score(&Batch::left_padded(&rows, 0).unwrap());
    let right = score(&Batch::right_padded(&rows, 0).unwrap());
    let alone: Vec<f32> = rows.iter().map(|r| score(&Batch::unpadded(std::slice::from_ref(r)).unwrap())[0]).collect();
    assert!(max_abs_diff(&left, &alone) < 1e-5, "{left:?} vs {alone:?}");
    assert!(max_abs_diff(&right, &alone) < 1e-5, "{right:?} vs {alone:?}");
    assert!(alone.iter().any(|&s| s.abs() > 1e-3), "scores are not trivially zero");
    // gradients reach the head and the backbone through the gathered rows
    let batch = Batch::left_padded(&rows, 0).unwrap();
    let idx: Vec<usize> = (0..3).map(|r| r * batch.t + batch.t - 1).collect();
    let h = m.forward_hidden(&batch, OwnedTape::<f32, Cpu>::default()).unwrap();
    let grads = head.read_at(h, &idx).unwrap().sum::<Rank0, _>().backward();
    assert!(grads.get(&head.w).as_vec().iter().any(|g| g.abs() > 0.0));
    assert_eq!(grads.get(&head.b).as_vec(), vec![3.0], "d(sum of 3 scores)/d(bias) = 3");
    assert!(grads.get(&m.wte).as_vec().iter().any(|g| g.abs() > 0.0));
    assert!(head.read_at(m.forward_hidden(&batch, NoneTape).unwrap(), &[99]).is_err());
}
