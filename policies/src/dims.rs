//! The sizes and switches every layer reads, resolved from any family's config
//! ([`crate::config::ModelConfig::dims`]).

use crate::error::PolicyError;

/// Which transformer family a checkpoint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// GPT-2: learned positions, LayerNorm, GELU (tanh), biases, fused `c_attn`.
    Gpt2,
    /// Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases (Qwen2: biases on q, k
    /// and v, [`Dims::qkv_bias`]; Qwen3: q/k head norms, [`Dims::qk_norm`]; Gemma 2 and 3:
    /// see [`crate::gemma2`] and [`crate::gemma3`]).
    Llama,
    /// GPT-NeoX (Pythia): GPT-2's LayerNorms, GELU MLP and biases with RoPE on part of each
    /// head ([`Dims::partial_rotary`]) and, in most checkpoints, a parallel residual
    /// ([`Dims::parallel_residual`]); see [`crate::gpt_neox`].
    GptNeox,
}

/// Normalisation layer kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `(x - mean) / sqrt(var + eps) * w + b`
    LayerNorm,
    /// `x / sqrt(mean(x²) + eps) * w`
    RmsNorm,
}

/// Which GELU the GPT-2 MLP uses (transformers' `activation_function`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeluKind {
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    Tanh,
    /// `gelu`: the exact `x·Φ(x) = 0.5·x·(1 + erf(x/√2))` (PyTorch's `nn.GELU()`, nanoGPT's).
    Erf,
}

/// The activation of a gated MLP's gate (Llama family): `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Glu {
    /// SiLU (SwiGLU: Llama, Qwen).
    Silu,
    /// The tanh GELU (GeGLU: Gemma).
    GeluTanh,
}

/// The sizes every layer needs, resolved from either family. Built by [`crate::config::ModelConfig::dims`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dims {
    /// Family.
    pub family: Family,
    /// Vocabulary size V.
    pub vocab: usize,
    /// Width d.
    pub d_model: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// MLP width.
    pub d_ff: usize,
    /// Maximum positions.
    pub max_positions: usize,
    /// Norm epsilon.
    pub norm_eps: f32,
    /// RoPE base (rotary families).
    pub rope_theta: f32,
    /// The scaling of the RoPE frequencies (Llama 3's, LongRoPE's, linear), if the config has
    /// one.
    pub rope_scaling: Option<crate::rope::RopeScaling>,
    /// LM head tied to the token embedding.
    pub tied: bool,
    /// Init std.
    pub init_std: f32,
    /// The MLP's GELU (GPT-2, GPT-NeoX; Llama's SwiGLU ignores it).
    pub gelu: GeluKind,
    /// Whether linears and norms carry biases (GPT-2 by default, GPT-NeoX; never Llama).
    pub bias: bool,
    /// Whether the q, k and v projections carry biases (Qwen2), whatever `bias` says.
    pub qkv_bias: bool,
    /// Whether each head's queries and keys pass an RMSNorm (gain `(Dh,)`) before RoPE (Qwen3,
    /// Gemma 3).
    pub qk_norm: bool,
    /// Multiplier on the token embeddings (Gemma: `√d`; Granite's `embedding_multiplier`; 1
    /// elsewhere).
    pub embed_scale: f32,
    /// RMSNorm weights `w` act as the gain `1 + w` (Gemma; transformers initialises `w` to 0).
    pub norm_unit_offset: bool,
    /// A norm on each branch's output too, before its residual add (Gemma 2 and 3, OLMo 2).
    pub post_norms: bool,
    /// A norm on each branch's input (every family but OLMo 2, whose norms are all on the
    /// branches' outputs: [`Dims::post_norms`]).
    pub pre_norms: bool,
    /// The q/k norms ([`Dims::qk_norm`]) run over each row's whole projection (gains `(H·Dh,)`
    /// and `(Hkv·Dh,)`, OLMo 2) instead of over each head (gain `(Dh,)`, Qwen3, Gemma 3).
    pub qk_norm_full: bool,
    /// The gated MLP's activation (Llama family).
    pub glu: Glu,
    /// Multiplier on the queries before `q·kᵀ/√Dh`: `√(Dh / query_pre_attn_scalar)` for Gemma
    /// (scores scaled by `query_pre_attn_scalar^-½`), `attention_multiplier·√Dh` for Granite, 1
    /// elsewhere.
    pub query_scale: f32,
    /// The attention window of local layers (Gemma 2's and 3's sliding layers; which layers are local
    /// is [`crate::config::ModelConfig::layer_windows`]): a query sees its last `w` positions, itself included.
    pub sliding_window: Option<usize>,
    /// The RoPE base of local layers (Gemma 3's, unscaled); `None`: the global RoPE (Mistral).
    pub rope_local_theta: Option<f32>,
    /// RoPE turns only the first `n` dimensions of each head, passing the rest through
    /// (GPT-NeoX's `rotary_pct`); `None`: the whole head.
    pub partial_rotary: Option<usize>,
    /// The MLP reads the block's input instead of the attention's output:
    /// `y = x + attn(ln₁(x)) + mlp(ln₂(x))` (GPT-NeoX's `use_parallel_residual`).
    pub parallel_residual: bool,
    /// q, k and v stored as one `nn.Linear` (`qkv_proj`, rows `q | k | v`) and the MLP's gate and
    /// up as another (`gate_up_proj`, rows `gate | up`): Phi-3's checkpoint layout (the network
    /// is Llama's).
    pub fused_projections: bool,
    /// Multiplier on each branch's output before its residual add (Granite's
    /// `residual_multiplier`; 1 elsewhere).
    pub residual_scale: f32,
    /// Multiplier on the LM logits before any cap or temperature (Granite's `1 /
    /// logits_scaling`; 1 elsewhere).
    pub logit_scale: f32,
    /// Gemma 2's soft cap on the attention scores: `c·tanh(s/c)` of the scaled scores before the
    /// mask and softmax ([`crate::softcap`]); `None`: uncapped.
    pub attn_softcap: Option<f32>,
    /// Gemma 2's soft cap on the LM logits, `c·tanh(z/c)` before any temperature; `None`:
    /// uncapped.
    pub final_softcap: Option<f32>,
}

impl Dims {
    /// The fields only some families set, at their values for every other family (spread into
    /// each family's constructor).
    pub(crate) const PLAIN: Dims = Dims {
        family: Family::Llama,
        vocab: 0,
        d_model: 0,
        n_layer: 0,
        n_head: 0,
        n_kv_head: 0,
        head_dim: 0,
        d_ff: 0,
        max_positions: 0,
        norm_eps: 0.0,
        rope_theta: 0.0,
        rope_scaling: None,
        tied: false,
        init_std: 0.0,
        gelu: GeluKind::Tanh,
        bias: false,
        qkv_bias: false,
        qk_norm: false,
        embed_scale: 1.0,
        norm_unit_offset: false,
        post_norms: false,
        pre_norms: true,
        qk_norm_full: false,
        glu: Glu::Silu,
        query_scale: 1.0,
        sliding_window: None,
        rope_local_theta: None,
        partial_rotary: None,
        parallel_residual: false,
        fused_projections: false,
        residual_scale: 1.0,
        logit_scale: 1.0,
        attn_softcap: None,
        final_softcap: None,
    };

    /// The sizes a local (sliding-window) layer's RoPE uses: its own base without scaling where
    /// it has one, else the global RoPE.
    pub fn local_rope(&self) -> Dims {
        match self.rope_local_theta {
            Some(theta) => Dims { rope_theta: theta, rope_scaling: None, ..*self },
            None => *self,
        }
    }

    /// Normalisation kind of this family.
    pub fn norm(&self) -> NormKind {
        match self.family {
            Family::Gpt2 | Family::GptNeox => NormKind::LayerNorm,
            Family::Llama => NormKind::RmsNorm,
        }
    }

    /// Whether positions enter through RoPE (every family but GPT-2, whose table is learned).
    pub fn rotary(&self) -> bool {
        self.family != Family::Gpt2
    }

    /// How many of each head's dimensions RoPE turns: [`Dims::partial_rotary`], else all.
    pub fn rotary_dim(&self) -> usize {
        self.partial_rotary.unwrap_or(self.head_dim)
    }
    /// Whether linears and norms carry biases.
    pub fn has_bias(&self) -> bool {
        self.bias
    }
    /// Width of the q projection (n_head · head_dim).
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }
    /// Width of the k and v projections (n_kv_head · head_dim).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// The longest sequence the model can take: its position table's size with learned
    /// positions (GPT-2); with LongRoPE, the pretrained context whose frequencies rlhf runs
    /// ([`crate::rope::LongRope`]); none with other rotary positions, where `max_positions`
    /// only says what it was trained on.
    pub fn position_limit(&self) -> Option<usize> {
        match self.rope_scaling {
            Some(crate::rope::RopeScaling::LongRope(l)) => Some(l.original_max_position_embeddings),
            _ => (!self.rotary()).then_some(self.max_positions),
        }
    }

    /// The config field behind [`Dims::position_limit`], for errors.
    pub fn position_limit_field(&self) -> &'static str {
        match self.rope_scaling {
            Some(crate::rope::RopeScaling::LongRope(_)) => {
                "original_max_position_embeddings: past it transformers switches to longrope's long_factor, which \
                 rlhf does not run"
            }
            _ => "n_positions",
        }
    }

    /// How many positions a generation may fill: the [`Dims::position_limit`], else
    /// `max_positions`.
    pub fn usable_positions(&self) -> usize {
        self.position_limit().unwrap_or(self.max_positions)
    }

    /// A decode step's inputs: every id inside the vocabulary and every position inside the
    /// [`Dims::position_limit`].
    pub(crate) fn check_step(&self, ids: &[u32], positions: &[usize]) -> Result<(), PolicyError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(PolicyError::Input(format!("token id {id} is outside the vocabulary of {}", self.vocab)));
        }
        if let Some(limit) = self.position_limit().filter(|&l| positions.iter().any(|&p| p >= l)) {
            let field = self.position_limit_field();
            return Err(PolicyError::Input(format!("sequence longer than the model's {limit} positions ({field})")));
        }
        Ok(())
    }
}

/// The number of each head's dimensions RoPE turns for a `partial_rotary_factor` of `pct`
/// (transformers: `int(head_dim · pct)`), as [`Dims::partial_rotary`]: `None` for the whole
/// head; an error naming `field` unless it is even and from 2 to `head_dim`.
pub(crate) fn partial_rotary(head_dim: usize, pct: f64, field: &str) -> Result<Option<usize>, PolicyError> {
    let rotary = (head_dim as f64 * pct) as usize;
    if rotary == 0 || !rotary.is_multiple_of(2) || rotary > head_dim {
        let msg = format!(
            "{pct} of a {head_dim}-wide head turns {rotary} dimensions: RoPE needs an even number from 2 to {head_dim}"
        );
        return Err(PolicyError::config(field, msg));
    }
    Ok((rotary < head_dim).then_some(rotary))
}

/// The inverse of [`partial_rotary`]: the `partial_rotary_factor` that turns `rotary` of a
/// `head_dim`-wide head's dimensions (a GGUF file's `rope.dimension_count`), an error when
/// transformers' `int(head_dim · pct)` would not give `rotary` back.
pub(crate) fn rotary_share(rotary: usize, head_dim: usize) -> Result<f64, String> {
    let pct = rotary as f64 / head_dim as f64;
    match (head_dim as f64 * pct) as usize == rotary {
        true => Ok(pct),
        false => Err(format!("RoPE on {rotary} of {head_dim} dimensions has no exact share")),
    }
}
