//! Rotary position embedding tables ("default" rope type, NeoX / rotate_half layout).

/// `cos` and `sin` tables, `(N, Dh)` row-major for `N` positions, computed in f32 as transformers
/// does: `inv_freq[i] = 1 / theta^(2i/Dh)`, `angle = pos · inv_freq[i]`, both halves repeated.
pub fn tables(positions: &[usize], head_dim: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq = inv_freq(head_dim, theta);
    let (mut cos, mut sin) = (vec![0.0; positions.len() * head_dim], vec![0.0; positions.len() * head_dim]);
    for (n, &p) in positions.iter().enumerate() {
        for i in 0..half {
            let ang = p as f32 * inv_freq[i];
            let (s, c) = ang.sin_cos();
            cos[n * head_dim + i] = c;
            cos[n * head_dim + i + half] = c;
            sin[n * head_dim + i] = s;
            sin[n * head_dim + i + half] = s;
        }
    }
    (cos, sin)
}

/// `inv_freq[i] = 1 / theta^(2i / Dh)` for `i < Dh/2`.
pub fn inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect()
}

/// Rotates one head vector in place: `x·cos + rotate_half(x)·sin`.
pub fn apply(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}
