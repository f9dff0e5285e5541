//! The demo's measurements: preference pairs labelled by the gold reward, samples, proxy
//! (reward-model) scores, the reward model's gold accuracy, a policy's gold / proxy / KL /
//! length, and best-of-n.

use anyhow::{Context, Result};
use dfdx::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rlhf_envs::{RewardInput, RewardModel};
use rlhf_policies::{generate, CausalLm, InferenceModel, LearnedReward, SamplingConfig, Tokenizer};

use super::world::{gold_reward, World};
use super::PolicyEval;
use crate::math::sigmoid;
use crate::stages::ppo_models::{sequence_log_ratios, Seq};

/// A labelled pair: (prompt, chosen, rejected, gold of chosen, gold of rejected).
pub(super) type Pair = (String, String, String, f32, f32);

/// `n` prompts, two SFT samples each, the chosen one drawn with P = σ(gold_a − gold_b) —
/// noisy, like people. Returns (prompt, chosen, rejected, gold_chosen, gold_rejected).
pub(super) fn labelled_pairs(
    model: &CausalLm<Cpu>,
    tok: &Tokenizer,
    w: &mut World,
    n: usize,
    seed: u64,
) -> Result<Vec<Pair>> {
    let prompts = w.prompts(n);
    let ids: Vec<Vec<u32>> = prompts.iter().flat_map(|p| [tok.encode(p), tok.encode(p)]).collect::<Result<_, _>>()?;
    let texts = sample(model, tok, &ids, seed)?.texts;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    Ok(prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (a, b) = (&texts[2 * i], &texts[2 * i + 1]);
            let (ga, gb) = (gold_reward(p, a), gold_reward(p, b));
            if rng.gen_bool(sigmoid((ga - gb) as f64)) {
                (p.clone(), a.clone(), b.clone(), ga, gb)
            } else {
                (p.clone(), b.clone(), a.clone(), gb, ga)
            }
        })
        .collect())
}

/// One sampled response per prompt (at most 24 tokens; EOS kept in the ids) and its text.
pub(super) struct Samples {
    pub(super) ids: Vec<Vec<u32>>,
    pub(super) texts: Vec<String>,
}

pub(super) fn sample(model: &CausalLm<Cpu>, tok: &Tokenizer, prompts: &[Vec<u32>], seed: u64) -> Result<Samples> {
    let eos = tok.eos_id().context("the demo tokenizer has an EOS")?;
    let engine = InferenceModel::from_model(model);
    let cfg = SamplingConfig { max_new_tokens: 24, eos_ids: vec![eos], seed, ..Default::default() };
    let mut out = Samples { ids: vec![], texts: vec![] };
    for (i, chunk) in prompts.chunks(64).enumerate() {
        // a fresh seed per chunk: rows of different chunks must not share random streams
        let cfg = SamplingConfig { seed: crate::data::mix(seed, i as u64, 7), ..cfg.clone() };
        let g = generate(&engine, chunk, tok.pad_id().unwrap_or(eos), &cfg)?;
        for t in g.tokens {
            let body: Vec<u32> = t.iter().copied().filter(|&x| x != eos).collect();
            out.texts.push(tok.decode(&body)?);
            out.ids.push(t);
        }
    }
    Ok(out)
}

/// Proxy scores of prompt + response texts (re-encoded, EOS appended).
pub(super) fn proxy_scores(
    rm: &mut LearnedReward<Cpu>,
    tok: &Tokenizer,
    prompts: &[String],
    responses: &[String],
) -> Result<Vec<f32>> {
    let eos = tok.eos_id().context("EOS")?;
    let ids: Vec<Vec<u32>> =
        responses.iter().map(|r| Ok([tok.encode(r)?, vec![eos]].concat())).collect::<Result<_>>()?;
    proxy_scores_ids(rm, tok, prompts, &ids)
}

/// Proxy scores of prompt texts with sampled response ids.
pub(super) fn proxy_scores_ids(
    rm: &mut LearnedReward<Cpu>,
    tok: &Tokenizer,
    prompts: &[String],
    responses: &[Vec<u32>],
) -> Result<Vec<f32>> {
    let inputs: Vec<RewardInput> = prompts
        .iter()
        .zip(responses)
        .map(|(p, r)| {
            Ok(RewardInput {
                prompt_ids: tok.encode(p)?,
                response_ids: r.clone(),
                prompt: p.clone(),
                response: String::new(),
                reference: None,
            })
        })
        .collect::<Result<_>>()?;
    Ok(rm.score(&inputs)?)
}

/// The reward model's agreement with the gold ordering on pairs whose gold scores differ.
pub(super) fn gold_accuracy(rm: &mut LearnedReward<Cpu>, tok: &Tokenizer, pairs: &[Pair]) -> Result<f64> {
    let prompts: Vec<String> = pairs.iter().flat_map(|p| [p.0.clone(), p.0.clone()]).collect();
    let responses: Vec<String> = pairs.iter().flat_map(|p| [p.1.clone(), p.2.clone()]).collect();
    let s = proxy_scores(rm, tok, &prompts, &responses)?;
    let (mut right, mut n) = (0, 0);
    for (i, p) in pairs.iter().enumerate() {
        if p.3 != p.4 {
            n += 1;
            right += usize::from((s[2 * i] > s[2 * i + 1]) == (p.3 > p.4));
        }
    }
    Ok(right as f64 / n.max(1) as f64)
}

/// Gold, proxy, sampled KL to `reference` and length of one sample per prompt from `model`.
#[allow(clippy::too_many_arguments)]
pub(super) fn evaluate(
    name: &str,
    model: &CausalLm<Cpu>,
    reference: &CausalLm<Cpu>,
    rm: &mut LearnedReward<Cpu>,
    tok: &Tokenizer,
    texts: &[String],
    prompts: &[Vec<u32>],
    seed: u64,
) -> Result<(PolicyEval, Vec<String>)> {
    let s = sample(model, tok, prompts, seed ^ 0xe7a1)?;
    let gold: f64 = texts.iter().zip(&s.texts).map(|(p, r)| gold_reward(p, r) as f64).sum::<f64>() / texts.len() as f64;
    let proxy = proxy_scores_ids(rm, tok, texts, &s.ids)?;
    let eos = tok.eos_id().context("EOS")?;
    let seqs: Vec<Seq> =
        prompts.iter().zip(&s.ids).map(|(p, r)| Seq { ids: [p.as_slice(), r].concat(), prompt_len: p.len() }).collect();
    let refs: Vec<&Seq> = seqs.iter().collect();
    let n_tok: usize = seqs.iter().map(Seq::resp_len).sum();
    let kls = sequence_log_ratios(model, reference, &refs, tok.pad_id().unwrap_or(eos), 1.0)?;
    let kl = kls.iter().sum::<f64>() / seqs.len() as f64;
    let eval = PolicyEval {
        name: name.into(),
        gold,
        proxy: proxy.iter().map(|&x| x as f64).sum::<f64>() / proxy.len() as f64,
        kl,
        length: n_tok as f64 / seqs.len() as f64,
    };
    Ok((eval, s.texts))
}

/// Best-of-n from `model` for n = 1, 2, 4, … ≤ `max_n`, picked by the proxy; KL = log n − (n−1)/n.
pub(super) fn best_of_n(
    model: &CausalLm<Cpu>,
    rm: &mut LearnedReward<Cpu>,
    tok: &Tokenizer,
    texts: &[String],
    prompts: &[Vec<u32>],
    max_n: usize,
    seed: u64,
) -> Result<Vec<PolicyEval>> {
    let many: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), max_n)).collect();
    let s = sample(model, tok, &many, seed ^ 0xb0)?;
    let many_texts: Vec<String> = texts.iter().flat_map(|t| std::iter::repeat_n(t.clone(), max_n)).collect();
    let proxy = proxy_scores_ids(rm, tok, &many_texts, &s.ids)?;
    let mut out = vec![];
    let mut n = 1;
    while n <= max_n {
        let (mut gold, mut px, mut len) = (0.0, 0.0, 0.0);
        for (i, t) in texts.iter().enumerate() {
            let k = (0..n).max_by(|&a, &b| proxy[i * max_n + a].total_cmp(&proxy[i * max_n + b])).unwrap_or(0);
            gold += gold_reward(t, &s.texts[i * max_n + k]) as f64;
            px += proxy[i * max_n + k] as f64;
            len += s.ids[i * max_n + k].len() as f64;
        }
        let m = texts.len() as f64;
        let kl = (n as f64).ln() - (n as f64 - 1.0) / n as f64;
        out.push(PolicyEval { name: format!("best-of-{n}"), gold: gold / m, proxy: px / m, kl, length: len / m });
        n *= 2;
    }
    Ok(out)
}
