//! Supervised fine-tuning: the loss covers exactly the response tokens and the EOS, a tiny
//! model overfits a handful of pairs, resume is exact, and long or malformed records are
//! handled as configured.

mod common;

use common::*;
use dfdx::prelude::*;
use rlhf::prompt_format::{ChatPrompt, PromptFormat, Transcript};
use rlhf::schedule::LrSchedule;
use rlhf::stages::sft::{
    sft_loss, sft_loss_packed, tokenize, train, AssistantTurns, Example, SftConfig, SftRecord, Truncation,
};
use rlhf_policies::{AdamWConfig, Batch, CausalLm, ModelConfig, Tokenizer};

const PAIRS: [(&str, &str); 6] = [
    ("color of sky?", "blue."),
    ("color of grass?", "green."),
    ("color of snow?", "white."),
    ("color of coal?", "black."),
    ("color of blood?", "red."),
    ("color of sun?", "yellow."),
];

/// A fresh char-level model folder and a JSONL file of PAIRS.
fn setup(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let all: String = PAIRS.iter().map(|(p, r)| format!("{p} {r}")).collect::<Vec<_>>().join("\n");
    let tok = Tokenizer::char_level(&format!("{all} Q:A")).unwrap();
    let model = CausalLm::new(ModelConfig::gpt2_preset(tok.vocab_size(), 32, 2, 2, 64), &Cpu::default(), 3).unwrap();
    let init = dir.join("init");
    model.save_pretrained(&init, Some(&tok)).unwrap();
    let data = dir.join("pairs.jsonl");
    let lines: Vec<String> =
        PAIRS.iter().map(|(p, r)| serde_json::json!({"q": p, "a": format!(" {r}")}).to_string()).collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    (init, data)
}

fn cfg(dir: &std::path::Path, steps: usize) -> SftConfig {
    let (init, data) = setup(dir);
    SftConfig {
        out_dir: dir.join("run"),
        init,
        data,
        prompt_field: "q".into(),
        response_field: "a".into(),
        val_fraction: 0.0,
        prompt_template: "Q:{prompt}A:".into(),
        max_len: 40,
        batch_size: 3,
        steps,
        optim: rlhf_policies::AdamWConfig { lr: 1e-2, ..Default::default() },
        schedule: LrSchedule::warmup_cosine(2),
        eval_every: 10,
        checkpoint_every: 10,
        ..Default::default()
    }
}

/// A record read from `line`.
fn rec(line: usize, prompt: &str, response: &str) -> SftRecord {
    SftRecord { line, prompt: prompt.into(), rendered: false, response: response.into() }
}

#[test]
fn loss_is_the_mean_over_response_and_eos_tokens_only() {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), 1);
    let (m, tok) = rlhf_policies::checkpoint::load_with_tokenizer(&c.init, &Cpu::default()).unwrap();
    let records: Vec<SftRecord> =
        PAIRS[..3].iter().enumerate().map(|(i, (p, r))| rec(i + 1, p, &format!(" {r}"))).collect();
    let (ex, _, _) = tokenize(&c, &PromptFormat::plain(&c.prompt_template), &tok, 0, (&c.data, &records)).unwrap();
    assert_eq!(ex[0].ids.last(), Some(&0), "EOS appended");
    assert_eq!(ex[0].prompt_len, tok.encode("Q:color of sky?A:").unwrap().len());
    let refs: Vec<&Example> = ex.iter().collect();
    let got = sft_loss(&m, &refs, 0, NoneTape).unwrap().array();
    // by hand: each example alone, -log p of every token after the prompt (response + EOS)
    let v = m.dims.vocab;
    let (mut sum, mut n) = (0.0f64, 0usize);
    for e in &ex {
        let logits = m.forward(&Batch::unpadded(std::slice::from_ref(&e.ids)).unwrap(), NoneTape).unwrap().as_vec();
        for t in e.prompt_len..e.ids.len() {
            sum -= log_softmax_ref(&logits[(t - 1) * v..t * v])[e.ids[t] as usize] as f64;
            n += 1;
        }
    }
    let want = (sum / n as f64) as f32;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    // packed two and one to a row: the same examples, the same mean
    let packed = sft_loss_packed(&m, &[vec![&ex[0], &ex[1]], vec![&ex[2]]], 0, NoneTape).unwrap().array();
    assert!((packed - want).abs() < 1e-5, "{packed} vs {want}");
}

#[test]
fn packed_training_learns_and_resumes_exactly() {
    let packed = |dir: &std::path::Path| SftConfig { packing: true, batch_size: 2, max_len: 64, ..cfg(dir, 30) };
    let a = tempfile::tempdir().unwrap();
    let report = train(packed(a.path()), false).unwrap();
    let m = comparable_metrics(&a.path().join("run"));
    let first = m[0]["loss"].as_f64().unwrap() as f32;
    assert!(report.train_loss < 0.3 * first, "{first} -> {}", report.train_loss);
    // two examples (23–26 input tokens each) fit a 64-token row: 4 of the 6 per step
    for (s, r) in m.iter().enumerate() {
        assert_eq!(r["epoch"].as_f64(), Some((s + 1) as f64 * 4.0 / 6.0), "step {}", s + 1);
    }
    let b = tempfile::tempdir().unwrap();
    train(packed(b.path()), false).unwrap();
    std::fs::remove_dir_all(b.path().join("run/checkpoints/step-30")).unwrap();
    train(packed(b.path()), true).unwrap();
    assert_eq!(comparable_metrics(&b.path().join("run")), m);
}

#[test]
fn epochs_set_the_steps_one_example_or_one_packed_row_at_a_time() {
    let d = tempfile::tempdir().unwrap();
    let steps_of = |c: SftConfig| {
        let out = c.out_dir.clone();
        let report = train(c, false).unwrap();
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        let m = comparable_metrics(&out);
        assert_eq!((saved["steps"].as_u64(), m.len()), (Some(report.steps as u64), report.steps), "recorded");
        (report.steps, m.last().unwrap()["epoch"].as_f64().unwrap())
    };
    let two_and_a_half = |sub: &str| SftConfig { epochs: Some(2.5), out_dir: d.path().join(sub), ..cfg(d.path(), 1) };
    // 2.5 × 6 pairs = 15 examples, 3 per step: 5 steps
    assert_eq!(steps_of(two_and_a_half("a")), (5, 2.5));
    // packed two to a row: 8 rows take the first 15 (and one more), 2 rows per step: 4 steps
    let packed = SftConfig { packing: true, batch_size: 2, max_len: 64, ..two_and_a_half("b") };
    assert_eq!(steps_of(packed), (4, 16.0 / 6.0));
    let bad = SftConfig { epochs: Some(0.0), ..two_and_a_half("c") };
    let e = train(bad, false).unwrap_err().to_string();
    assert!(e.contains("epochs must be a positive number"), "{e}");
}

#[test]
fn frozen_parameters_stay_as_they_were_and_the_rest_train() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), 10);
    c.optim.freeze = vec!["wte".into(), "wpe".into(), "blocks.0".into()];
    let report = train(c.clone(), false).unwrap();
    assert!(report.train_loss.is_finite());
    let read =
        |dir: &std::path::Path| rlhf_policies::checkpoint::read_safetensors(&dir.join("model.safetensors")).unwrap();
    let (before, after) = (read(&c.init), read(&d.path().join("run/checkpoints/step-10")));
    let (mut same, mut moved) = (vec![], vec![]);
    for (name, t) in &before {
        if after[name].data == t.data {
            same.push(name.as_str())
        } else {
            moved.push(name.as_str())
        }
    }
    assert!(same.iter().all(|n| n.contains("wte") || n.contains("wpe") || n.contains(".h.0.")), "{same:?}");
    assert!(same.iter().any(|n| n.contains(".h.0.")) && same.len() == 2 + 12, "embeddings and block 0: {same:?}");
    assert!(moved.iter().all(|n| n.contains(".h.1.") || n.contains("ln_f")) && moved.len() == 12 + 2, "{moved:?}");
    // the optimizer keeps moments of the parameters that train only (PyTorch's frozen
    // parameters are not the optimizer's), and a resume from such a state is exact
    let opt =
        rlhf_policies::checkpoint::read_safetensors(&d.path().join("run/checkpoints/step-10/optimizer.safetensors"))
            .unwrap();
    assert!(
        opt.keys().all(|k| k.starts_with("exp_avg") && (k.contains(".blocks.1.") || k.contains(".ln_f."))),
        "{opt:?}"
    );
    // block 1: two norms, q, k, v, o and the MLP's two maps, each with a bias (16); ln_f (2)
    assert_eq!(opt.len(), 2 * (16 + 2), "two moments of each parameter of block 1 and ln_f");
    let resumed = SftConfig { out_dir: d.path().join("resumed"), checkpoint_every: 4, ..c.clone() };
    train(resumed.clone(), false).unwrap();
    std::fs::remove_dir_all(d.path().join("resumed/checkpoints/step-10")).unwrap();
    train(resumed, true).unwrap();
    assert_eq!(comparable_metrics(&d.path().join("resumed")), comparable_metrics(&d.path().join("run")));
    // trlx's `num_layers_unfrozen: 1` on the 2-block model is the same list: the same run
    let top = SftConfig { out_dir: d.path().join("top"), ..c.clone() };
    let top =
        SftConfig { optim: AdamWConfig { freeze: vec![], num_layers_unfrozen: Some(1), ..c.optim.clone() }, ..top };
    train(top, false).unwrap();
    assert_eq!(comparable_metrics(&d.path().join("top")), comparable_metrics(&d.path().join("run")));
    // a name that matches nothing is refused at the first step
    let mut typo = cfg(d.path(), 1);
    typo.out_dir = d.path().join("typo");
    typo.optim.freeze = vec!["blocks.5".into()];
    let e = train(typo, false).unwrap_err().to_string();
    assert!(e.contains("\"blocks.5\" matches no parameter"), "{e}");
}

/// `assistant_turns: all`: a two-exchange conversation trains on both assistant messages —
/// exactly as its two prefixes ending at each assistant message would under `last`; without
/// `messages_field` the setting is an error.
#[test]
fn every_assistant_turn_trains_as_its_own_prefix() {
    let d = tempfile::tempdir().unwrap();
    let base = SftConfig { prompt_template: "{prompt}".into(), max_len: 60, ..cfg(d.path(), 4) };
    let template = "{% for m in messages %}Q{{ m.content }}{% endfor %}{% if add_generation_prompt %}A{% endif %}";
    std::fs::write(base.init.join("chat_template.jinja"), template).unwrap();
    let m = |role: &str, content: &str| serde_json::json!({"role": role, "content": content});
    let exchange = |i: usize| [m("user", PAIRS[i].0), m("assistant", PAIRS[i].1)];
    let (whole, prefixes) = (d.path().join("whole.jsonl"), d.path().join("prefixes.jsonl"));
    let (mut w, mut p) = (vec![], vec![]);
    for i in (0..PAIRS.len()).step_by(2) {
        let (a, b) = (exchange(i), exchange(i + 1));
        w.push(serde_json::json!({"m": [&a[0], &a[1], &b[0], &b[1]]}).to_string());
        p.push(serde_json::json!({"m": [&a[0], &a[1]]}).to_string());
        p.push(serde_json::json!({"m": [&a[0], &a[1], &b[0], &b[1]]}).to_string());
    }
    std::fs::write(&whole, w.join("\n")).unwrap();
    std::fs::write(&prefixes, p.join("\n")).unwrap();
    let run = |sub: &str, c: SftConfig| {
        let out = d.path().join(sub);
        let report = train(SftConfig { out_dir: out.clone(), messages_field: Some("m".into()), ..c }, false).unwrap();
        (report.train_examples, comparable_metrics(&out))
    };
    let all = run("all", SftConfig { data: whole.clone(), assistant_turns: AssistantTurns::All, ..base.clone() });
    let last = run("last", SftConfig { data: prefixes, ..base.clone() });
    assert_eq!(all.0, 6, "three conversations of two assistant turns");
    assert_eq!(all, last);
    assert_ne!(run("whole-last", SftConfig { data: whole.clone(), ..base.clone() }).0, 6, "last: one example each");
    // val_fraction keeps a conversation's turns on one side: half of the 6 examples would cut
    // the second conversation in two, so it is held out whole with the third
    let split = SftConfig {
        out_dir: d.path().join("split"),
        data: whole.clone(),
        messages_field: Some("m".into()),
        assistant_turns: AssistantTurns::All,
        val_fraction: 0.5,
        ..base.clone()
    };
    let r = train(split, false).unwrap();
    assert_eq!((r.train_examples, r.val_examples), (2, 4));
    // rlhf eval --assistant-turns all reads them the same way
    let eval = |data: &std::path::Path, assistant_turns| {
        let e = rlhf::eval::EvalData {
            data: data.to_path_buf(),
            block: None,
            batch: 4,
            fields: ("q".into(), "a".into()),
            messages_field: Some("m".into()),
            assistant_turns,
            prompt_template: "{prompt}".into(),
            chat: false,
            format: Default::default(),
        };
        let r = rlhf::eval::evaluate(&d.path().join("all/checkpoints/step-4"), &e, &Cpu::default()).unwrap();
        (r["loss"].clone(), r["tokens"].clone())
    };
    assert_eq!(eval(&whole, AssistantTurns::All), eval(&d.path().join("prefixes.jsonl"), AssistantTurns::Last));
    let e = train(SftConfig { assistant_turns: AssistantTurns::All, ..base }, false).unwrap_err().to_string();
    assert!(e.contains("messages_field"), "{e}");
}

#[test]
fn conversations_train_as_the_same_prompts_in_the_chat_template() {
    let d = tempfile::tempdir().unwrap();
    let base = SftConfig { prompt_template: "{prompt}".into(), ..cfg(d.path(), 6) };
    let template = "{% for m in messages %}Q{{ m.content }}{% endfor %}\
                    {% if add_generation_prompt %}A{{ x if x is defined else '' }}{% endif %}";
    std::fs::write(base.init.join("chat_template.jinja"), template).unwrap();
    // the pairs as conversations: one user message, then the assistant's
    let conversations = d.path().join("conversations.jsonl");
    let lines: Vec<String> = PAIRS
        .iter()
        .map(|(p, r)| {
            let m = [
                serde_json::json!({"role": "user", "content": p}),
                serde_json::json!({"role": "assistant", "content": r}),
            ];
            serde_json::json!({"m": m}).to_string()
        })
        .collect();
    std::fs::write(&conversations, lines.join("\n")).unwrap();
    let run = |sub: &str, c: SftConfig| {
        let out = d.path().join(sub);
        train(SftConfig { out_dir: out.clone(), ..c }, false).unwrap();
        comparable_metrics(&out)
    };
    let pairs = run("pairs", SftConfig { chat: Some(ChatPrompt::default()), ..base.clone() });
    let chats = SftConfig { data: conversations.clone(), messages_field: Some("m".into()), ..base.clone() };
    assert_eq!(run("conversations", chats.clone()), pairs, "the same examples, the same run");
    // a template variable reaches both the same way, and changes the run
    let x = ChatPrompt { template_kwargs: serde_json::from_str(r#"{"x": "Q"}"#).unwrap(), ..Default::default() };
    let pairs_x = run("pairs_x", SftConfig { chat: Some(x.clone()), ..base.clone() });
    assert_eq!(run("conversations_x", SftConfig { chat: Some(x), ..chats.clone() }), pairs_x);
    assert_ne!(pairs_x, pairs);
    // rlhf eval's response loss reads them the same way
    let eval = |data: &std::path::Path, messages_field: Option<&str>, chat: bool| {
        let d = rlhf::eval::EvalData {
            data: data.to_path_buf(),
            block: None,
            batch: 4,
            fields: ("q".into(), "a".into()),
            messages_field: messages_field.map(String::from),
            assistant_turns: Default::default(),
            prompt_template: "{prompt}".into(),
            chat,
            format: Default::default(),
        };
        rlhf::eval::evaluate(&d.data.parent().unwrap().join("conversations/checkpoints/step-6"), &d, &Cpu::default())
            .unwrap()
    };
    let (by_messages, by_pairs) = (eval(&conversations, Some("m"), false), eval(&base.data, None, true));
    assert_eq!(
        (by_messages["loss"].clone(), by_messages["tokens"].clone()),
        (by_pairs["loss"].clone(), by_pairs["tokens"].clone())
    );
    // what is refused, by file, line and field
    let bad = d.path().join("bad.jsonl");
    let cases = [
        (r#"{"m": [{"role": "user", "content": "a"}]}"#, "must end with an assistant message"),
        (
            r#"{"m": [{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "b"}]}"#,
            "unknown field `name`",
        ),
        (r#"{"m": "a b"}"#, "field `m`"),
    ];
    for (line, want) in cases {
        std::fs::write(&bad, line).unwrap();
        let e =
            train(SftConfig { data: bad.clone(), out_dir: d.path().join("bad"), ..chats.clone() }, false).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("bad.jsonl: line 1") && e.contains(want), "{e}");
    }
    let mixed = SftConfig { prompt_template: "Q:{prompt}".into(), out_dir: d.path().join("mixed"), ..chats };
    assert!(train(mixed, false).unwrap_err().to_string().contains("leave out prompt_template"));
}

#[test]
fn a_template_without_the_prompt_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let c = SftConfig { prompt_template: "Q: A:".into(), ..cfg(d.path(), 1) };
    let e = train(c, false).unwrap_err().to_string();
    assert!(e.contains("\"Q: A:\" has no {prompt}"), "{e}");
    // and a schedule given its warm-up twice
    let schedule = serde_json::from_str(r#"{"kind": "warmup_cosine", "warmup": 2, "warmup_ratio": 0.1}"#).unwrap();
    let e = train(SftConfig { schedule, ..cfg(d.path(), 1) }, false).unwrap_err().to_string();
    assert!(e.contains("warmup or warmup_ratio, not both"), "{e}");
}

#[test]
fn overfits_a_handful_of_pairs_and_resumes_exactly() {
    let a = tempfile::tempdir().unwrap();
    let report = train(cfg(a.path(), 30), false).unwrap();
    let m: Vec<serde_json::Value> = std::fs::read_to_string(a.path().join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = m[0]["loss"].as_f64().unwrap() as f32;
    assert!(report.train_loss < 0.3 * first, "{first} -> {}", report.train_loss);
    // TRL's `epoch`: 3 of the 6 pairs per step
    for (s, r) in m.iter().enumerate() {
        assert_eq!(r["epoch"].as_f64(), Some((s + 1) as f64 * 3.0 / 6.0), "step {}", s + 1);
    }
    let b = tempfile::tempdir().unwrap();
    train(cfg(b.path(), 30), false).unwrap();
    std::fs::remove_dir_all(b.path().join("run/checkpoints/step-30")).unwrap();
    train(cfg(b.path(), 30), true).unwrap();
    assert_eq!(comparable_metrics(&b.path().join("run")), comparable_metrics(&a.path().join("run")));
}

#[test]
fn long_records_are_skipped_truncated_or_rejected_as_configured() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), 2);
    let (_, tok) = rlhf_policies::checkpoint::load_with_tokenizer(&c.init, &Cpu::default()).unwrap();
    let records = vec![rec(1, "sky?", " blue."), rec(3, "sky?", " blue blue blue blue blue.")];
    c.max_len = 16;
    let (ex, skipped, truncated) =
        tokenize(&c, &PromptFormat::plain(&c.prompt_template), &tok, 0, (&c.data, &records)).unwrap();
    assert_eq!((ex.len(), skipped, truncated), (1, 1, 0));
    c.truncation = Truncation::TruncateResponse;
    let (ex, skipped, truncated) =
        tokenize(&c, &PromptFormat::plain(&c.prompt_template), &tok, 0, (&c.data, &records)).unwrap();
    assert_eq!((ex.len(), skipped, truncated, ex[1].ids.len()), (2, 0, 1, 16));
    c.truncation = Truncation::Error;
    let e =
        tokenize(&c, &PromptFormat::plain(&c.prompt_template), &tok, 0, (&c.data, &records)).unwrap_err().to_string();
    assert!(e.contains("line 3") && e.contains("max_len 16"), "{e}");
}

#[test]
fn skipped_records_are_counted_and_a_run_with_nothing_left_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    // "Q:" + prompt + "A:" + response + EOS, one token per char: 24 to 26 tokens, except the
    // grass pair's 27
    let mut c = cfg(d.path(), 1);
    c.max_len = 26;
    let report = train(c.clone(), false).unwrap();
    assert_eq!((report.train_examples, report.skipped_too_long, report.truncated), (5, 1, 0));
    // every record too long: an error naming the file and the counts, not an empty run
    c.max_len = 4;
    c.out_dir = d.path().join("run-none");
    let e = format!("{:#}", train(c.clone(), false).unwrap_err());
    assert!(e.contains("pairs.jsonl") && e.contains("6 records, 6 skipped as too long"), "{e}");
}

#[test]
fn a_separate_held_out_file_replaces_the_fraction_split() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), 2);
    let val = d.path().join("val.jsonl");
    let line = |p: &str, r: &str| serde_json::json!({"q": p, "a": r}).to_string();
    std::fs::write(&val, [line("color of sky?", " blue."), line("color of sun?", " yellow.")].join("\n")).unwrap();
    c.val_data = Some(val.clone());
    c.val_fraction = 0.5; // not used when val_data is given
    let report = train(c.clone(), false).unwrap();
    assert_eq!((report.train_examples, report.val_examples), (6, 2));
    assert!(report.val_loss.is_some_and(f32::is_finite), "{:?}", report.val_loss);
    // a held-out file whose every record is too long: an error naming it
    std::fs::write(&val, line("color of sky?", " blue blue blue blue blue blue blue blue.")).unwrap();
    c.out_dir = d.path().join("run-long");
    let e = format!("{:#}", train(c.clone(), false).unwrap_err());
    assert!(e.contains("val.jsonl") && e.contains("no held-out examples"), "{e}");
    // a malformed held-out file is named with its line and field
    std::fs::write(&val, format!("{}\n{{\"q\": \"color of sky?\"}}", line("color of sun?", " yellow."))).unwrap();
    c.out_dir = d.path().join("run-bad");
    let e = format!("{:#}", train(c, false).unwrap_err());
    assert!(e.contains("val.jsonl") && e.contains("line 2") && e.contains("field `a`"), "{e}");
}

#[test]
fn malformed_data_names_file_line_and_field() {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), 2);
    std::fs::write(&c.data, "{\"q\": \"a\", \"a\": \"b\"}\n{\"q\": \"a\"}\n").unwrap();
    let e = train(c, false).unwrap_err().to_string();
    assert!(e.contains("pairs.jsonl") && e.contains("line 2") && e.contains("`a`"), "{e}");
}

#[test]
fn chat_prompts_wrap_the_templated_prompt_in_the_model_s_template() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), 2);
    c.chat = Some(ChatPrompt::default());
    let e = format!("{:#}", train(c.clone(), false).unwrap_err());
    assert!(e.contains("chat_template") && e.contains(&c.init.display().to_string()), "{e}");
    // a template in the char-level vocabulary: "Q" before each message, "A" opens the answer
    let template = "{% for m in messages %}Q{{ m.content }}{% endfor %}{% if add_generation_prompt %}A{% endif %}";
    std::fs::write(c.init.join("chat_template.jinja"), template).unwrap();
    let (m, tok) = rlhf_policies::checkpoint::load_with_tokenizer(&c.init, &Cpu::default()).unwrap();
    let format = PromptFormat::new(&c.prompt_template, c.chat.as_ref(), &tok, &m.config, &c.init).unwrap();
    let records = vec![rec(1, "color of sky?", " blue.")];
    let (ex, _, _) = tokenize(&c, &format, &tok, 0, (&c.data, &records)).unwrap();
    let prompt = tok.encode("QQ:color of sky?A:A").unwrap();
    assert_eq!(ex[0].ids[..ex[0].prompt_len], prompt[..]);
    assert_eq!(ex[0].ids[prompt.len()..], [tok.encode("blue.").unwrap(), vec![0]].concat()[..], "response trimmed");
    // a conversation transcript as the prompt, laid out turn by turn
    let mut t = c.clone();
    (t.prompt_template, t.max_len) = ("{prompt}".into(), 60);
    t.chat = Some(ChatPrompt { transcript: Some(Transcript::default()), ..Default::default() });
    let format = PromptFormat::new(&t.prompt_template, t.chat.as_ref(), &tok, &m.config, &t.init).unwrap();
    let hh = "\n\nHuman: color of sky?\n\nAssistant: blue.\n\nHuman: color of snow?\n\nAssistant:";
    let (ex, _, _) = tokenize(&t, &format, &tok, 0, (&t.data, &[rec(1, hh, " white.")])).unwrap();
    assert_eq!(ex[0].ids[..ex[0].prompt_len], tok.encode("Qcolor of sky?Qblue.Qcolor of snow?A").unwrap()[..]);
    let e = tokenize(&t, &format, &tok, 0, (&t.data, &[rec(1, "color of sky?", "x")])).unwrap_err().to_string();
    assert!(e.contains("not a transcript"), "{e}");
    let report = train(c, false).unwrap();
    assert!(report.train_loss.is_finite(), "{report:?}");
}

#[test]
fn a_max_len_beyond_the_model_s_positions_is_refused_before_training() {
    let d = tempfile::tempdir().unwrap();
    let mut c = cfg(d.path(), 2);
    c.max_len = 65; // the model has 64 positions
    let e = train(c.clone(), false).unwrap_err().to_string();
    assert!(e.contains("max_len 65") && e.contains("64 positions") && e.contains("init"), "{e}");
    assert!(!d.path().join("run/metrics.jsonl").exists(), "no step ran");
    c.max_len = 64;
    train(c, false).unwrap();
}

/// A tokenizer whose post-processor puts a BOS before a text (Llama 3's, fixture from
/// `scripts/fixtures/pre_tokenizers_fixture.py`): each example starts with it, as
/// transformers' `tokenizer(prompt)` does, and it counts as prompt (no loss on it).
#[test]
fn a_llama_style_tokenizer_s_bos_starts_each_prompt() {
    let d = tempfile::tempdir().unwrap();
    let c = cfg(d.path(), 1);
    let tok = Tokenizer::from_file(&common::fixture("tokenizers").join("llama3.json")).unwrap();
    let records = [rec(1, "Q: to be or not?", " A: to be.")];
    let (ex, _, _) = tokenize(&c, &PromptFormat::plain("{prompt}"), &tok, 1, (&c.data, &records)).unwrap();
    let prompt = tok.encode("Q: to be or not?").unwrap();
    assert_eq!(ex[0].ids, [vec![0], prompt.clone(), tok.encode(" A: to be.").unwrap(), vec![1]].concat());
    assert_eq!(ex[0].prompt_len, 1 + prompt.len());
}
