// ---- the whole exact step in one call (the "fused" kernel) ------------------------------------
// `Step` holds a decoder stack's weights (the target's layers, or the MTP head's fc + layer) and
// runs an exact decode / verify step of one or more sequences from token ids to logits without
// returning to Python: per step one call instead of ~900 torch calls. The arithmetic is that of
// the ops above, each value a fixed function of its own row:
//   matmuls        rowmm's fixed-order tiles (or the AVX512-BF16 dot products for bf16 models);
//   norms          sum of squares in index order, * 1/sqrt(ss / D + eps) * w;
//   activations    scalar libm exp per element (silu, sigmoid, softplus);
//   attention      attend_one per (row, head), over exactly its own keys;
//   recurrence     gdn_seq per sequence;
//   MoE            fp32 router softmax, top-k (ties: lower index), renormalised; each row's
//                  picked experts evaluated on its own rows (only those experts' weights are
//                  read), summed in rank order, then + sigmoid(shared gate) * shared expert.
// Activations are rounded to the model dtype where the torch path keeps them in it (the
// residual stream, every matmul input), fp32 elsewhere. Nothing depends on the row count, the
// other rows or the thread split, so verify rows equal decode rows bit for bit.

enum Kind { KF32 = 0, KBF16 = 1, KF16 = 2, KI8 = 3 };

static int kind_of(const torch::Tensor& t) {
  if (t.dtype() == torch::kFloat32) return KF32;
  if (t.dtype() == torch::kBFloat16) return KBF16;
  if (t.dtype() == torch::kFloat16) return KF16;
  if (t.dtype() == torch::kInt8) return KI8;
  TORCH_CHECK(false, "Step: unsupported dtype ", t.dtype());
}

static inline float round_to(float v, int kind) {
  if (kind == KBF16) return (float)at::BFloat16(v);
  if (kind == KF16) return (float)at::Half(v);
  return v;
}

static inline float load_any(const void* p, int kind, int64_t i) {
  if (kind == KF32) return ((const float*)p)[i];
  if (kind == KBF16) return (float)((const at::BFloat16*)p)[i];
  return (float)((const at::Half*)p)[i];
}

static inline void store_any(void* p, int kind, int64_t i, float v) {
  if (kind == KF32) ((float*)p)[i] = v;
  else if (kind == KBF16) ((at::BFloat16*)p)[i] = at::BFloat16(v);
  else ((at::Half*)p)[i] = at::Half(v);
}

struct Mat {  // a weight [N, K] (rows of a larger tensor allowed), int8 with per-row fp32 scales
  const void* p = nullptr;
  const float* scale = nullptr;
  int kind = KF32;
  int64_t N = 0, K = 0;
};

static Mat mat_of(const torch::Tensor& w, const torch::Tensor& scale = torch::Tensor()) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "Step: weights must be contiguous CPU [N, K]");
  Mat m;
  m.p = w.data_ptr();
  m.kind = kind_of(w);
  m.N = w.size(0);
  m.K = w.size(1);
  if (m.kind == KI8) {
    TORCH_CHECK(scale.defined() && scale.numel() == m.N && scale.dtype() == torch::kFloat32, "Step: int8 needs fp32 scales");
    m.scale = scale.data_ptr<float>();
  }
  return m;
}

static Mat expert_mat(const torch::Tensor& stacked, int64_t e) {  // stacked [E, N, K] -> expert e's [N, K]
  Mat m;
  m.kind = kind_of(stacked);
  m.N = stacked.size(1);
  m.K = stacked.size(2);
  m.p = (const char*)stacked.data_ptr() + e * m.N * m.K * stacked.element_size();
  return m;
}

// y [M, N] = x [M, K] (fp32, values already in the model dtype) @ w.T, one fixed order per output
static void matmul(const float* x, int64_t M, const Mat& w, float* y, int act_kind, int64_t par_bytes) {
  const int64_t K = w.K;
  if (M == 0) return;
#if defined(MTPLX_AVX512BF16)
  if (w.kind == KBF16 && act_kind == KBF16) {  // x holds bf16 values: exact in bf16
    const int64_t Kp = (K + 31) / 32 * 32;
    std::vector<at::BFloat16> xb(M * Kp, at::BFloat16(0.0f));
    for (int64_t r = 0; r < M; r++) for (int64_t k = 0; k < K; k++) xb[r * Kp + k] = at::BFloat16(x[r * K + k]);
    run_dot(xb.data(), M, Kp, K, (const at::BFloat16*)w.p, y, w.N, par_bytes);
    return;
  }
#endif
  if (w.kind == KF32) run<float>(x, M, K, (const float*)w.p, y, w.N, nullptr, par_bytes);
  else if (w.kind == KBF16) run<at::BFloat16>(x, M, K, (const at::BFloat16*)w.p, y, w.N, nullptr, par_bytes);
  else if (w.kind == KF16) run<at::Half>(x, M, K, (const at::Half*)w.p, y, w.N, nullptr, par_bytes);
  else run<int8_t>(x, M, K, (const int8_t*)w.p, y, w.N, w.scale, par_bytes);
}

static inline float sigmoid_f(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// out [N, D] = round(x * 1/sqrt(sum(x^2) / D + eps) * w) per row
static void rms(const float* x, int64_t N, int64_t D, const float* w, float eps, float* out, int kind) {
  const float inv_d = 1.0f / (float)D;
  for (int64_t n = 0; n < N; n++) {
    const float* xr = x + n * D;
    float ss = 0.0f;
    for (int64_t i = 0; i < D; i++) ss += xr[i] * xr[i];
    const float r = 1.0f / std::sqrt(ss * inv_d + eps);
    for (int64_t i = 0; i < D; i++) out[n * D + i] = round_to(xr[i] * r * w[i], kind);
  }
}

static void round_all(float* x, int64_t n, int kind) {
  if (kind != KF32) for (int64_t i = 0; i < n; i++) x[i] = round_to(x[i], kind);
}

struct Seq { int64_t pos0, T, row0; };

struct AttnW { Mat qkv, o; const float *q_norm, *k_norm; int64_t nh, nkv, hd, rot; float scale; };
struct GdnW { Mat in_proj, out; const float *conv_w, *A_log, *dt_bias, *gnorm; GdnShape g; };
struct MlpW {
  bool moe = false;
  Mat gate_up, down;                       // dense SwiGLU
  Mat router, shared_gate, shared_gu;      // MoE: [E, H], [1, H], [2Is, H]
  torch::Tensor experts_gu, experts_down;  // [E, 2I, H], [E, H, I]
  Mat shared_down;                         // [H, Is]
  int64_t E = 0, I = 0, Is = 0, topk = 0;
  bool renorm = true;
};
struct LayerW { bool attn = false; const float *in_norm, *post_norm; AttnW a; GdnW g; MlpW m; };

class Step {
 public:
  Step(int64_t H, double eps, torch::Tensor embed, torch::Tensor final_norm, int64_t par_bytes)
      : H_(H), eps_((float)eps), par_(par_bytes) {
    embed_ = keep(embed);
    kind_ = kind_of(embed);
    final_norm_ = f32(final_norm);
  }

  // the MTP head's input: u = fc([norm_emb(embed(id)) | norm_hid(hidden)])
  void set_fc(torch::Tensor norm_emb, torch::Tensor norm_hid, torch::Tensor fc) {
    norm_emb_ = f32(norm_emb);
    norm_hid_ = f32(norm_hid);
    fc_ = mat_of(keep(fc));
    has_fc_ = true;
  }

  void add_attention(torch::Tensor in_norm, torch::Tensor post_norm, torch::Tensor qkv, torch::Tensor o,
                     torch::Tensor q_norm, torch::Tensor k_norm, int64_t nh, int64_t nkv, int64_t hd, int64_t rot) {
    LayerW L;
    L.attn = true;
    L.in_norm = f32(in_norm);
    L.post_norm = f32(post_norm);
    L.a = AttnW{mat_of(keep(qkv)), mat_of(keep(o)), f32(q_norm), f32(k_norm), nh, nkv, hd, rot,
                1.0f / std::sqrt((float)hd)};
    layers_.push_back(std::move(L));
  }

  void add_gdn(torch::Tensor in_norm, torch::Tensor post_norm, torch::Tensor in_proj, torch::Tensor conv_w,
               torch::Tensor A_log, torch::Tensor dt_bias, torch::Tensor gnorm, torch::Tensor out_proj,
               int64_t nk, int64_t dk, int64_t nv, int64_t dv) {
    LayerW L;
    L.in_norm = f32(in_norm);
    L.post_norm = f32(post_norm);
    L.g.in_proj = mat_of(keep(in_proj));
    L.g.out = mat_of(keep(out_proj));
    L.g.conv_w = f32(conv_w);
    L.g.A_log = f32(A_log);
    L.g.dt_bias = f32(dt_bias);
    L.g.gnorm = f32(gnorm);
    L.g.g = GdnShape{conv_w.size(0), conv_w.size(1) - 1, nk, dk, nv, dv, eps_};
    layers_.push_back(std::move(L));
  }

  void set_dense_mlp(torch::Tensor gate_up, torch::Tensor down) {  // the last added layer's MLP
    MlpW& m = layers_.back().m;
    m.moe = false;
    m.gate_up = mat_of(keep(gate_up));
    m.down = mat_of(keep(down));
  }

  void set_moe(torch::Tensor router, torch::Tensor shared_gate, torch::Tensor shared_gu, torch::Tensor experts_gu, torch::Tensor experts_down, torch::Tensor shared_down,
               int64_t topk, bool renorm) {
    TORCH_CHECK(experts_gu.dim() == 3 && experts_gu.is_contiguous() && experts_down.dim() == 3 &&
                experts_down.is_contiguous(), "Step: experts must be contiguous [E, N, K]");
    MlpW& m = layers_.back().m;
    m.moe = true;
    m.router = mat_of(keep(router));
    m.shared_gate = mat_of(keep(shared_gate));
    m.shared_gu = mat_of(keep(shared_gu));
    m.experts_gu = keep(experts_gu);
    m.experts_down = keep(experts_down);
    m.shared_down = mat_of(keep(shared_down));
    m.E = experts_gu.size(0);
    m.I = experts_gu.size(1) / 2;
    m.Is = shared_down.size(1);
    m.topk = topk;
    m.renorm = renorm;
    TORCH_CHECK(m.router.N == m.E && m.shared_gate.N == 1 && m.shared_gu.N == 2 * m.Is, "Step: MoE shapes");
  }

  // ids [N]; hidden [N, H] (the MTP head) or an empty tensor; seqs: pos0 / T per sequence (rows in
  // order); kv: per sequence, per attention layer, K then V [nkv, cap, hd]; gdn: per sequence, per
  // GatedDeltaNet layer, conv [K-1, C] then state [nv, dk, dv]; cos / sin [>= max position + 1, rot]
  // fp32; logits of the rows `logit_rows` (empty: all) through head_w (scale: int8 rows).
  // -> [post [N, H], pre [N, H], logits [R, V], then per sequence per GatedDeltaNet layer the
  //     state after each position [T, nv, dk, dv], then likewise the conv window after each
  //     position [T, K-1, C] (model dtype): keeping m positions is taking entry m - 1 of both]
  std::vector<torch::Tensor> run(torch::Tensor ids, torch::Tensor hidden, std::vector<int64_t> pos0,
                                 std::vector<int64_t> lens, std::vector<torch::Tensor> kv,
                                 std::vector<torch::Tensor> gdn, torch::Tensor cos, torch::Tensor sin,
                                 torch::Tensor head_w, torch::Tensor head_scale, std::vector<int64_t> logit_rows) {
    TORCH_CHECK(ids.dtype() == torch::kInt64 && ids.is_contiguous() && pos0.size() == lens.size(), "Step.run: ids / seqs");
    TORCH_CHECK(cos.dtype() == torch::kFloat32 && cos.is_contiguous() && sin.is_contiguous(), "Step.run: rope tables");
    const int64_t N = ids.size(0), H = H_;
    std::vector<Seq> seqs;
    int64_t row = 0;
    for (size_t i = 0; i < lens.size(); i++) { seqs.push_back({pos0[i], lens[i], row}); row += lens[i]; }
    TORCH_CHECK(row == N, "Step.run: the sequence lengths must add up to the ids");
    int64_t n_attn = 0, n_gdn = 0;
    for (auto& L : layers_) (L.attn ? n_attn : n_gdn)++;
    TORCH_CHECK((int64_t)kv.size() == 2 * n_attn * (int64_t)seqs.size() &&
                (int64_t)gdn.size() == 2 * n_gdn * (int64_t)seqs.size(), "Step.run: cache tensor count");
    const auto opt = torch::TensorOptions().dtype(embed_.dtype());
    std::vector<torch::Tensor> outs(3);

    std::vector<float> x(N * H), h(N * H), o(N * H);
    embed_rows(ids, hidden, x);
    const float* cs = cos.data_ptr<float>();
    const float* sn = sin.data_ptr<float>();
    const int64_t rot_stride = cos.size(1);
    int64_t ai = 0, gi = 0;
    std::vector<torch::Tensor> gdn_states(n_gdn * seqs.size()), gdn_convs(n_gdn * seqs.size());
    for (auto& L : layers_) {
      rms(x.data(), N, H, L.in_norm, eps_, h.data(), kind_);
      if (L.attn) {
        std::vector<torch::Tensor> c;
        for (size_t s = 0; s < seqs.size(); s++) { c.push_back(kv[(s * n_attn + ai) * 2]); c.push_back(kv[(s * n_attn + ai) * 2 + 1]); }
        attention(L.a, h.data(), N, seqs, c, cs, sn, rot_stride, o.data());
        ai++;
      } else {
        std::vector<torch::Tensor> c;
        for (size_t s = 0; s < seqs.size(); s++) { c.push_back(gdn[(s * n_gdn + gi) * 2]); c.push_back(gdn[(s * n_gdn + gi) * 2 + 1]); }
        std::vector<torch::Tensor> st, cv;
        gated_delta(L.g, h.data(), N, seqs, c, st, cv, o.data());
        for (size_t s = 0; s < seqs.size(); s++) {
          gdn_states[s * n_gdn + gi] = st[s];
          gdn_convs[s * n_gdn + gi] = cv[s];
        }
        gi++;
      }
      add_round(x, o);
      rms(x.data(), N, H, L.post_norm, eps_, h.data(), kind_);
      if (L.m.moe) moe(L.m, h.data(), N, o.data());
      else dense_mlp(L.m, h.data(), N, o.data());
      add_round(x, o);
    }
    auto pre = torch::empty({N, H}, opt), post = torch::empty({N, H}, opt);
    rms(x.data(), N, H, final_norm_, eps_, h.data(), kind_);
    for (int64_t i = 0; i < N * H; i++) { store_any(pre.data_ptr(), kind_, i, x[i]); store_any(post.data_ptr(), kind_, i, h[i]); }
    outs[0] = post;
    outs[1] = pre;
    outs[2] = logits(h, N, head_w, head_scale, logit_rows, opt);
    for (auto& t : gdn_states) outs.push_back(t);
    for (auto& t : gdn_convs) outs.push_back(t);
    return outs;
  }

  // Greedy drafting through the MTP head, `depth` steps in one call (no return to Python between
  // them): step 0 runs the pairs (ids [T], hidden [T, H]) at head positions pos0.., each next step
  // its predecessor's argmax with that step's last post-norm (use_post) or pre-norm row at the next
  // position. Each step is run() as a one-step call would make it, so the drafts are the same.
  // kv: the head's K and V [nkv, cap >= pos0 + T + depth - 1, hd] -> the drafted ids [depth]
  torch::Tensor draft_chain(torch::Tensor ids, torch::Tensor hidden, int64_t pos0, std::vector<torch::Tensor> kv,
                            torch::Tensor cos, torch::Tensor sin, torch::Tensor head_w, torch::Tensor head_scale,
                            int64_t depth, bool use_post) {
    TORCH_CHECK(has_fc_ && depth >= 1 && ids.dim() == 1 && ids.size(0) >= 1, "Step.draft_chain: a head Step, depth >= 1");
    auto drafted = torch::empty({depth}, torch::TensorOptions().dtype(torch::kInt64));
    int64_t* d = drafted.data_ptr<int64_t>();
    int64_t T = ids.size(0), p = pos0;
    for (int64_t j = 0; j < depth; j++) {
      auto out = run(ids, hidden, {p}, {T}, kv, {}, cos, sin, head_w, head_scale, {T - 1});
      d[j] = argmax_rows(out[2])[0].item<int64_t>();
      if (j + 1 == depth) break;
      hidden = (use_post ? out[0] : out[1]).slice(0, T - 1, T).contiguous();
      ids = torch::full({1}, d[j], torch::TensorOptions().dtype(torch::kInt64));
      p += T;
      T = 1;
    }
    return drafted;
  }

 private:
  int64_t H_;
  float eps_;
  int64_t par_;
  int kind_ = KF32;
  torch::Tensor embed_;
  const float *final_norm_ = nullptr, *norm_emb_ = nullptr, *norm_hid_ = nullptr;
  bool has_fc_ = false;
  Mat fc_;
  std::vector<LayerW> layers_;
  std::vector<torch::Tensor> kept_;

  std::mutex pool_mu_;
  std::vector<c10::Storage> pool_;  // state buffers handed out before (a Qwen3.5 layer's: 1 MB a position)

  // A fresh fp32 tensor, or one on a pooled buffer no tensor uses any more (the pool holds its
  // storage's only reference). Without it each step would map new pages for every layer's
  // states and fault them in one by one (8% of a Qwen3.5-MoE-shaped decode).
  torch::Tensor reusable(std::vector<int64_t> shape) {
    std::lock_guard<std::mutex> lock(pool_mu_);  // sessions on other threads share this Step
    int64_t numel = 1;
    for (auto d : shape) numel *= d;
    const size_t bytes = numel * sizeof(float);
    const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
    for (auto& st : pool_)
      if (st.nbytes() == bytes && st.use_count() == 1) return torch::empty({0}, f32).set_(st, 0, shape);
    auto t = torch::empty(shape, f32);
    if (pool_.size() >= 256) pool_.erase(pool_.begin());
    pool_.push_back(t.storage());
    return t;
  }

  torch::Tensor keep(torch::Tensor t) {
    kept_.push_back(t);
    return t;
  }
  const float* f32(torch::Tensor t) {  // an fp32 copy kept alive (norm weights, gates)
    auto c = t.to(torch::kFloat32).contiguous();
    kept_.push_back(c);
    return c.data_ptr<float>();
  }

  void add_round(std::vector<float>& x, const std::vector<float>& o) {
    for (size_t i = 0; i < x.size(); i++) x[i] = round_to(x[i] + o[i], kind_);
  }

  void embed_rows(const torch::Tensor& ids, const torch::Tensor& hidden, std::vector<float>& x) {
    const int64_t N = ids.size(0), H = H_, V = embed_.size(0);
    const int64_t* id = ids.data_ptr<int64_t>();
    std::vector<float> e(N * H);
    for (int64_t n = 0; n < N; n++) {
      TORCH_CHECK(id[n] >= 0 && id[n] < V, "Step.run: token id ", id[n], " outside the vocabulary");
      for (int64_t i = 0; i < H; i++) e[n * H + i] = load_any(embed_.data_ptr(), kind_, id[n] * H + i);
    }
    if (!has_fc_) { x = e; return; }
    TORCH_CHECK(hidden.defined() && hidden.dim() == 2 && hidden.size(0) == N && hidden.size(1) == H, "Step.run: hidden [N, H]");
    auto hf = hidden.to(torch::kFloat32).contiguous();
    std::vector<float> hh(N * H), cat(N * 2 * H);
    for (int64_t i = 0; i < N * H; i++) hh[i] = round_to(hf.data_ptr<float>()[i], kind_);
    std::vector<float> en(N * H), hn(N * H);
    rms(e.data(), N, H, norm_emb_, eps_, en.data(), kind_);
    rms(hh.data(), N, H, norm_hid_, eps_, hn.data(), kind_);
    for (int64_t n = 0; n < N; n++) {
      std::memcpy(&cat[n * 2 * H], &en[n * H], H * sizeof(float));
      std::memcpy(&cat[n * 2 * H + H], &hn[n * H], H * sizeof(float));
    }
    matmul(cat.data(), N, fc_, x.data(), kind_, par_);
    round_all(x.data(), N * H, kind_);
  }

  void attention(const AttnW& a, const float* h, int64_t N, const std::vector<Seq>& seqs,
                 const std::vector<torch::Tensor>& caches, const float* cs, const float* sn, int64_t rs, float* out) {
    const int64_t nh = a.nh, nkv = a.nkv, hd = a.hd, W = a.qkv.N, q_rows = nh * 2 * hd, kv_rows = nkv * hd;
    std::vector<float> y(N * W), q(N * nh * hd), gate(N * nh * hd), att(N * nh * hd), tmp(hd);
    matmul(h, N, a.qkv, y.data(), kind_, par_);
    round_all(y.data(), N * W, kind_);
    auto norm_rope = [&](const float* src, const float* w, int64_t p, float* dst) {
      rms(src, 1, hd, w, eps_, tmp.data(), kind_);
      const int64_t half = a.rot / 2;
      for (int64_t j = 0; j < a.rot; j++) {
        const float rh = j < half ? -tmp[j + half] : tmp[j - half];
        dst[j] = round_to(tmp[j] * cs[p * rs + j] + rh * sn[p * rs + j], kind_);
      }
      for (int64_t j = a.rot; j < hd; j++) dst[j] = tmp[j];
    };
    std::vector<float> kr(hd);
    for (size_t s = 0; s < seqs.size(); s++) {
      const Seq& sq = seqs[s];
      const torch::Tensor &Kc = caches[2 * s], &Vc = caches[2 * s + 1];
      TORCH_CHECK(Kc.is_contiguous() && Vc.is_contiguous() && Kc.size(0) == nkv && Kc.size(2) == hd &&
                  Kc.size(1) >= sq.pos0 + sq.T && kind_of(Kc) == kind_ && kind_of(Vc) == kind_, "Step.run: KV cache");
      const int64_t cap = Kc.size(1);
      for (int64_t t = 0; t < sq.T; t++) {
        const int64_t n = sq.row0 + t, p = sq.pos0 + t;
        const float* yr = &y[n * W];
        for (int64_t i = 0; i < nh; i++) {
          norm_rope(yr + i * 2 * hd, a.q_norm, p, &q[(n * nh + i) * hd]);
          for (int64_t j = 0; j < hd; j++) gate[(n * nh + i) * hd + j] = round_to(sigmoid_f(yr[i * 2 * hd + hd + j]), kind_);
        }
        for (int64_t j = 0; j < nkv; j++) {
          norm_rope(yr + q_rows + j * hd, a.k_norm, p, kr.data());
          for (int64_t d = 0; d < hd; d++) {
            store_any(Kc.data_ptr(), kind_, (j * cap + p) * hd + d, kr[d]);
            store_any(Vc.data_ptr(), kind_, (j * cap + p) * hd + d, yr[q_rows + kv_rows + j * hd + d]);
          }
        }
      }
      float* Q = &q[sq.row0 * nh * hd];
      float* O = &att[sq.row0 * nh * hd];
      if (kind_ == KF32) attend_all<float>(Q, Kc.data_ptr<float>(), Vc.data_ptr<float>(), O, sq.T, nh, nkv, hd, cap, sq.pos0, a.scale);
      else if (kind_ == KBF16) attend_all<at::BFloat16>(Q, Kc.data_ptr<at::BFloat16>(), Vc.data_ptr<at::BFloat16>(), O, sq.T, nh, nkv, hd, cap, sq.pos0, a.scale);
      else attend_all<at::Half>(Q, Kc.data_ptr<at::Half>(), Vc.data_ptr<at::Half>(), O, sq.T, nh, nkv, hd, cap, sq.pos0, a.scale);
    }
    for (int64_t i = 0; i < N * nh * hd; i++) att[i] = round_to(round_to(att[i], kind_) * gate[i], kind_);
    matmul(att.data(), N, a.o, out, kind_, par_);
    round_all(out, N * H_, kind_);
  }

  void gated_delta(const GdnW& g, const float* h, int64_t N, const std::vector<Seq>& seqs,
                   const std::vector<torch::Tensor>& caches, std::vector<torch::Tensor>& states,
                   std::vector<torch::Tensor>& convs, float* out) {
    const GdnShape& s = g.g;
    const int64_t W = g.in_proj.N, C = s.C, vd = s.nv * s.dv;
    std::vector<float> y(N * W), core(N * vd);
    matmul(h, N, g.in_proj, y.data(), kind_, par_);
    round_all(y.data(), N * W, kind_);
    for (size_t i = 0; i < seqs.size(); i++) {
      const Seq& sq = seqs[i];
      const torch::Tensor &conv = caches[2 * i], &S0 = caches[2 * i + 1];
      TORCH_CHECK(conv.is_contiguous() && conv.dim() == 2 && conv.size(0) == s.K1 && conv.size(1) == C &&
                  S0.dtype() == torch::kFloat32 && S0.is_contiguous() && S0.numel() == s.nv * s.dk * s.dv,
                  "Step.run: GatedDeltaNet cache");
      const int conv_kind = kind_of(conv);
      std::vector<float> P(s.K1 * C);  // the conv window before this step, fp32 (no torch op: ~9 us a layer)
      const void* conv_p = conv.data_ptr();
      for (int64_t j = 0; j < s.K1 * C; j++) P[j] = load_any(conv_p, conv_kind, j);
      auto st = reusable({sq.T, s.nv, s.dk, s.dv});
      const float* yr = &y[sq.row0 * W];
      gdn_seq(s, sq.T, yr, W, yr + C, W, yr + C + vd, W, yr + C + vd + s.nv, W, P.data(), g.conv_w,
              g.A_log, g.dt_bias, S0.data_ptr<float>(), g.gnorm, &core[sq.row0 * vd], st.data_ptr<float>());
      states.push_back(st);
      // the conv window after each position, in the model dtype (its values already are: exact)
      auto cv = torch::empty({sq.T, s.K1, C}, embed_.options());
      void* cv_p = cv.data_ptr();
      for (int64_t t = 0; t < sq.T; t++)  // rows t+1 .. t+K-1 of [conv state; this step's rows]
        for (int64_t j = 0; j < s.K1; j++) {
          const int64_t src = t + 1 + j;
          const float* from = src < s.K1 ? &P[src * C] : yr + (src - s.K1) * W;
          const int64_t o = (t * s.K1 + j) * C;
          for (int64_t c = 0; c < C; c++) store_any(cv_p, kind_, o + c, from[c]);
        }
      convs.push_back(cv);
    }
    round_all(core.data(), N * vd, kind_);
    matmul(core.data(), N, g.out, out, kind_, par_);
    round_all(out, N * H_, kind_);
  }

  void dense_mlp(const MlpW& m, const float* h, int64_t N, float* out) {
    const int64_t I = m.gate_up.N / 2;
    std::vector<float> gu(N * 2 * I), act(N * I);
    matmul(h, N, m.gate_up, gu.data(), kind_, par_);
    round_all(gu.data(), N * 2 * I, kind_);
    for (int64_t n = 0; n < N; n++)
      for (int64_t i = 0; i < I; i++) act[n * I + i] = round_to(silu_f(gu[n * 2 * I + i]) * gu[n * 2 * I + I + i], kind_);
    matmul(act.data(), N, m.down, out, kind_, par_);
    round_all(out, N * H_, kind_);
  }

  void moe(const MlpW& m, const float* h, int64_t N, float* out) {
    const int64_t H = H_, E = m.E, I = m.I, Is = m.Is, k = m.topk;
    std::vector<float> r(N * E), sgl(N), sgu(N * 2 * Is), sact(N * Is), shared(N * H), buf(N * k * H), wt(N * k);
    std::vector<int64_t> pick(N * k);
    matmul(h, N, m.router, r.data(), kind_, par_);
    matmul(h, N, m.shared_gate, sgl.data(), kind_, par_);
    matmul(h, N, m.shared_gu, sgu.data(), kind_, par_);
    round_all(sgu.data(), N * 2 * Is, kind_);
    std::vector<float> p(E);
    for (int64_t n = 0; n < N; n++) {  // fp32 softmax, top-k by probability (ties: lower index)
      const float* row = &r[n * E];
      float mx = row[0], sum = 0.0f;
      for (int64_t e = 1; e < E; e++) mx = std::max(mx, row[e]);
      for (int64_t e = 0; e < E; e++) { p[e] = std::exp(row[e] - mx); sum += p[e]; }
      for (int64_t e = 0; e < E; e++) p[e] = p[e] / sum;
      float wsum = 0.0f;
      for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
          bool used = false;
          for (int64_t u = 0; u < j; u++) used |= pick[n * k + u] == e;
          if (!used && (best < 0 || p[e] > p[best])) best = e;
        }
        pick[n * k + j] = best;
        wsum += p[best];
      }
      for (int64_t j = 0; j < k; j++) wt[n * k + j] = m.renorm ? p[pick[n * k + j]] / wsum : p[pick[n * k + j]];
      for (int64_t i = 0; i < Is; i++) {
        sact[n * Is + i] = round_to(silu_f(sgu[n * 2 * Is + i]) * sgu[n * 2 * Is + Is + i], kind_);
      }
    }
    matmul(sact.data(), N, m.shared_down, shared.data(), kind_, par_);
    std::vector<std::vector<int64_t>> members(E);  // the (row, rank) slots that picked each expert
    for (int64_t i = 0; i < N * k; i++) members[pick[i]].push_back(i);
    std::vector<int64_t> active;
    for (int64_t e = 0; e < E; e++) if (!members[e].empty()) active.push_back(e);
    // Experts split across threads, each expert's matmuls on one thread (a thread split of its
    // columns would fork twice per expert for a few tens of microseconds of work). An output
    // slot is written by its expert alone and summed below in rank order: the split changes no bit.
    auto run_experts = [&](int64_t a0, int64_t a1) {
      std::vector<float> xe, gu, act, ye;
      for (int64_t a = a0; a < a1; a++) expert_rows(m, active[a], members[active[a]], h, wt, buf, xe, gu, act, ye);
    };
    const int64_t expert_bytes = 3 * I * H * (int64_t)m.experts_gu.element_size();
    if (at::get_num_threads() > 1 && active.size() > 1 && expert_bytes * (int64_t)active.size() >= par_)
      at::parallel_for(0, active.size(), 1, run_experts);
    else
      run_experts(0, active.size());
    for (int64_t n = 0; n < N; n++) {
      const float sg = sigmoid_f(sgl[n]);
      for (int64_t d = 0; d < H; d++) {
        float acc = buf[(n * k) * H + d];
        for (int64_t j = 1; j < k; j++) acc += buf[(n * k + j) * H + d];
        out[n * H + d] = round_to(acc + sg * shared[n * H + d], kind_);
      }
    }
  }

  // expert e over the rows of its slots: buf[slot] = routing weight * expert(h[row])
  void expert_rows(const MlpW& m, int64_t e, const std::vector<int64_t>& slots, const float* h,
                   const std::vector<float>& wt, std::vector<float>& buf, std::vector<float>& xe,
                   std::vector<float>& gu, std::vector<float>& act, std::vector<float>& ye) {
    const int64_t H = H_, I = m.I, k = m.topk, M = slots.size();
    xe.resize(M * H);
    gu.resize(M * 2 * I);
    act.resize(M * I);
    ye.resize(M * H);
    for (int64_t j = 0; j < M; j++) std::memcpy(&xe[j * H], h + (slots[j] / k) * H, H * sizeof(float));
    matmul(xe.data(), M, expert_mat(m.experts_gu, e), gu.data(), kind_, par_);
    round_all(gu.data(), M * 2 * I, kind_);
    for (int64_t j = 0; j < M; j++)
      for (int64_t i = 0; i < I; i++) act[j * I + i] = round_to(silu_f(gu[j * 2 * I + i]) * gu[j * 2 * I + I + i], kind_);
    matmul(act.data(), M, expert_mat(m.experts_down, e), ye.data(), kind_, par_);
    for (int64_t j = 0; j < M; j++) {
      const float w = wt[slots[j]];
      for (int64_t d = 0; d < H; d++) buf[slots[j] * H + d] = ye[j * H + d] * w;
    }
  }

  torch::Tensor logits(const std::vector<float>& post, int64_t N, const torch::Tensor& w, const torch::Tensor& scale,
                       const std::vector<int64_t>& rows, const torch::TensorOptions& opt) {
    const int64_t H = H_;
    Mat m = mat_of(w, scale);
    std::vector<float> sel;
    const float* x = post.data();
    int64_t R = N;
    if (!rows.empty()) {
      R = rows.size();
      sel.resize(R * H);
      for (int64_t i = 0; i < R; i++) {
        TORCH_CHECK(rows[i] >= 0 && rows[i] < N, "Step.run: logit row out of range");
        std::memcpy(&sel[i * H], &post[rows[i] * H], H * sizeof(float));
      }
      x = sel.data();
    }
    auto y = torch::empty({R, m.N}, torch::TensorOptions().dtype(torch::kFloat32));
    matmul(x, R, m, y.data_ptr<float>(), kind_, par_);
    return kind_ == KF32 ? y : y.to(opt.dtype());
  }
};
