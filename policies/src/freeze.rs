//! Which parameters a run leaves as they are: `optim.freeze` (names or prefixes of whole
//! parts) and `optim.num_layers_unfrozen` (trlx's: train only the top N blocks), resolved
//! against a model's parameter names.
//!
//! A trunk is the parameters of one transformer: `wte`, `wpe`, `blocks.<i>.…`, `ln_f`,
//! `lm_head`, all under one prefix (`""` for a bare model, `policy.` and `value.` in PPO).
//! When a trunk's embeddings and its first k blocks are all frozen, nothing below block k
//! needs a gradient: [`crate::CausalLm::set_frozen_trunk`] lets a taped forward run them
//! untaped, which is where freezing saves time and memory.

use crate::error::PolicyError;

/// Whether `prefix` is parameter `name` or a prefix of its whole dot-separated parts.
pub(crate) fn covers(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// `(trunk prefix, i)` of a parameter of block `i`: `policy.blocks.3.attn.q.weight` →
/// `("policy.", 3)`.
fn block_of(name: &str) -> Option<(&str, usize)> {
    let mut from = 0;
    while let Some(at) = name[from..].find("blocks.").map(|a| a + from) {
        let prefix = &name[..at];
        let index = name[at + "blocks.".len()..].split('.').next().and_then(|i| i.parse().ok());
        if let (true, Some(i)) = (prefix.is_empty() || prefix.ends_with('.'), index) {
            return Some((prefix, i));
        }
        from = at + 1;
    }
    None
}

/// The trunks among `names`: each prefix with its number of blocks, in order of appearance.
fn trunks<'a>(names: &[&'a str]) -> Vec<(&'a str, usize)> {
    let mut out: Vec<(&str, usize)> = Vec::new();
    for (prefix, i) in names.iter().filter_map(|n| block_of(n)) {
        match out.iter_mut().find(|(p, _)| *p == prefix) {
            Some((_, n)) => *n = (*n).max(i + 1),
            None => out.push((prefix, i + 1)),
        }
    }
    out
}

/// Per name in `names`, whether it is frozen by `freeze` or by `num_layers_unfrozen`: in every
/// trunk, the token and position embeddings (hence a tied LM head) and all but the top
/// `num_layers_unfrozen` blocks. Errors name the field (`optim.freeze`,
/// `optim.num_layers_unfrozen`): an entry that matches no parameter, a count above a trunk's
/// blocks, or nothing left to train.
///
/// trlx's `freeze_bottom_causal_layers` freezes the blocks only; its embeddings train, and
/// so their gradient runs back through every frozen block (and a tied embedding moves the
/// "frozen" reference of its hydra models, CarperAI/trlx#517). Freezing them too keeps the
/// bottom of the model exactly the SFT model's and lets its backward pass be skipped.
pub fn frozen_mask(
    freeze: &[String],
    num_layers_unfrozen: Option<usize>,
    names: &[&str],
) -> Result<Vec<bool>, PolicyError> {
    let err =
        |field: &str, msg: String| PolicyError::Config { file: "config".into(), field: format!("optim.{field}"), msg };
    for p in freeze {
        if !names.iter().any(|n| covers(p, n)) {
            let some: Vec<&str> = names.iter().copied().take(6).collect();
            return Err(err("freeze", format!("{p:?} matches no parameter (they are named like {})", some.join(", "))));
        }
    }
    let trunks = trunks(names);
    let bottom = |name: &str| -> bool {
        let Some(keep) = num_layers_unfrozen else { return false };
        if let Some((prefix, i)) = block_of(name) {
            let n = trunks.iter().find(|(p, _)| *p == prefix).map_or(0, |t| t.1);
            return i + keep < n;
        }
        trunks.iter().any(|(p, _)| name.strip_prefix(p).is_some_and(|rest| rest == "wte" || rest == "wpe"))
    };
    if let Some(keep) = num_layers_unfrozen {
        if trunks.is_empty() {
            return Err(err("num_layers_unfrozen", "the model has no transformer blocks".into()));
        }
        if let Some((p, n)) = trunks.iter().find(|(_, n)| keep > *n) {
            let which = if p.is_empty() { "the model".to_string() } else { format!("`{}`", p.trim_end_matches('.')) };
            return Err(err("num_layers_unfrozen", format!("{keep} is more than the {n} blocks of {which}")));
        }
    }
    let mask: Vec<bool> = names.iter().map(|n| freeze.iter().any(|p| covers(p, n)) || bottom(n)).collect();
    if mask.iter().all(|&f| f) {
        let field = if num_layers_unfrozen.is_some() { "num_layers_unfrozen" } else { "freeze" };
        return Err(err(field, "freezes every parameter: nothing would train".into()));
    }
    Ok(mask)
}

/// With `optim.lora`: freezes every parameter of every trunk in `names` but the LoRA updates'
/// (`….lora_a`, `….lora_b`, DoRA's `….lora_magnitude`: [`crate::checkpoint::is_lora`]); parameters outside the trunks (heads) keep their setting. An error
/// when the model carries no update or nothing is left to train.
pub fn freeze_all_but_lora(names: &[&str], mask: &mut [bool]) -> Result<(), PolicyError> {
    let err = |msg: &str| PolicyError::Config { file: "config".into(), field: "optim.lora".into(), msg: msg.into() };
    let trunks = trunks(names);
    let in_trunk = |name: &str| {
        trunks.iter().any(|(p, _)| {
            name.strip_prefix(p).is_some_and(|rest| {
                ["wte", "wpe", "lm_head"].contains(&rest) || rest.starts_with("blocks.") || rest.starts_with("ln_f.")
            })
        })
    };
    if !names.iter().any(|n| crate::checkpoint::is_lora(n)) {
        return Err(err("the model carries no LoRA update (it is added when a run starts)"));
    }
    for (name, frozen) in names.iter().zip(mask.iter_mut()) {
        *frozen |= in_trunk(name) && !crate::checkpoint::is_lora(name);
    }
    if mask.iter().all(|&f| f) {
        return Err(err("with `freeze` and `num_layers_unfrozen` it freezes every parameter: nothing would train"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT2: [&str; 9] = [
        "wte",
        "wpe",
        "blocks.0.ln1.weight",
        "blocks.1.ln1.weight",
        "blocks.1.attn.q.weight",
        "blocks.2.ln1.weight",
        "blocks.10.ln1.weight",
        "ln_f.weight",
        "blocks.1x",
    ];

    fn frozen<'a>(freeze: &[&str], keep: Option<usize>, names: &[&'a str]) -> Vec<&'a str> {
        let freeze: Vec<String> = freeze.iter().map(|s| s.to_string()).collect();
        let mask = frozen_mask(&freeze, keep, names).unwrap();
        names.iter().zip(mask).filter(|(_, f)| *f).map(|(n, _)| *n).collect()
    }

    #[test]
    fn freeze_matches_names_and_prefixes_of_whole_parts() {
        assert_eq!(frozen(&["wte", "blocks.1"], None, &GPT2), ["wte", "blocks.1.ln1.weight", "blocks.1.attn.q.weight"]);
        let typo = frozen_mask(&["block.1".into()], None, &GPT2).unwrap_err().to_string();
        assert!(typo.contains("`optim.freeze`") && typo.contains("\"block.1\" matches no parameter"), "{typo}");
        assert!(typo.contains("wte, wpe"), "{typo}");
        let all: Vec<String> = ["wte", "wpe", "blocks", "ln_f", "blocks.1x"].map(String::from).into();
        assert!(frozen_mask(&all, None, &GPT2).unwrap_err().to_string().contains("nothing would train"));
    }

    #[test]
    fn num_layers_unfrozen_keeps_the_top_blocks_of_every_trunk() {
        // 11 blocks (0..=10): the top two are 9 and 10; the embeddings freeze with the bottom
        let f = frozen(&[], Some(2), &GPT2);
        assert_eq!(
            f,
            [
                "wte",
                "wpe",
                "blocks.0.ln1.weight",
                "blocks.1.ln1.weight",
                "blocks.1.attn.q.weight",
                "blocks.2.ln1.weight"
            ]
        );
        // PPO's names: the policy's and the critic's trunks each keep their top block
        let ppo = [
            "policy.wte",
            "policy.blocks.0.ln1.weight",
            "policy.blocks.1.ln1.weight",
            "policy.ln_f.weight",
            "value.wte",
            "value.wpe",
            "value.blocks.0.ln1.weight",
            "value.blocks.1.ln1.weight",
            "value.blocks.2.ln1.weight",
            "value.head.weight",
        ];
        let f = frozen(&[], Some(1), &ppo);
        assert_eq!(
            f,
            [
                "policy.wte",
                "policy.blocks.0.ln1.weight",
                "value.wte",
                "value.wpe",
                "value.blocks.0.ln1.weight",
                "value.blocks.1.ln1.weight"
            ]
        );
        // 0 freezes every block and the embeddings; the union with `freeze`
        assert_eq!(frozen(&["policy.ln_f"], Some(0), &ppo).len(), 9);
        let over = frozen_mask(&[], Some(3), &ppo).unwrap_err().to_string();
        assert!(
            over.contains("`optim.num_layers_unfrozen`") && over.contains("3 is more than the 2 blocks of `policy`"),
            "{over}"
        );
        let none = frozen_mask(&[], Some(1), &["w", "b"]).unwrap_err().to_string();
        assert!(none.contains("no transformer blocks"), "{none}");
        assert_eq!(block_of("xblocks.1.w"), None);
        assert_eq!(block_of("value.blocks.12.mlp.fc.bias"), Some(("value.", 12)));
    }
}
