/* Body of the q/k kernel for one precision; included by perturbed_softmax.c (see its header comment).
 * Rows of logits are handled in whole vectors: a row of n keys occupies np = n rounded up to LANES
 * entries, whose padding lanes get probability exactly 0. Inputs with a key dimension (S, X, Y, a
 * per-key R) are read in whole vectors too, so each row must be readable LANES - 1 entries past hi. */

/* the arrays of both entry points (see perturbed_softmax.c), and their names to pass them on */
#define SN_QK_INPUTS                                                                                \
    const REAL *S, const int64_t *S_off, int64_t S_si,                                              \
    const REAL *A, const REAL *Bc, const int64_t *A_off, int64_t A_sj, int64_t A_si,                \
    const REAL *X, const REAL *Y, const int64_t *X_off, int64_t X_sj,                               \
    const REAL *R, const int64_t *R_off, int64_t R_sj, int64_t R_ss,                                \
    const REAL *F, const int64_t *F_off, const int64_t *lo_, const int64_t *hi_,                    \
    REAL *out, const int64_t *out_off
#define SN_QK_INPUT_NAMES \
    S, S_off, S_si, A, Bc, A_off, A_sj, A_si, X, Y, X_off, X_sj, R, R_off, R_sj, R_ss, F, F_off, lo_, hi_, out, out_off

typedef REAL NAME(vec) __attribute__((vector_size(LANES * sizeof(REAL))));
typedef REAL NAME(uvec) __attribute__((vector_size(LANES * sizeof(REAL)), aligned(sizeof(REAL))));
typedef IREAL NAME(ivec) __attribute__((vector_size(LANES * sizeof(REAL))));
typedef REAL NAME(hvec) __attribute__((vector_size(LANES * sizeof(REAL) / 2)));
typedef IREAL NAME(hivec) __attribute__((vector_size(LANES * sizeof(REAL) / 2)));

/* horizontal sum and max: halves first, so the scalar chain is LANES / 2 long */
static inline REAL NAME(hsum)(NAME(vec) v) {
    NAME(hvec) a, b;
    memcpy(&a, &v, sizeof a);
    memcpy(&b, (char *)&v + sizeof a, sizeof b);
    a += b;
    REAL s = a[0];
    for (int l = 1; l < LANES / 2; l++) s += a[l];
    return s;
}

static inline REAL NAME(hmax)(NAME(vec) v) {
    NAME(hvec) a, b;
    memcpy(&a, &v, sizeof a);
    memcpy(&b, (char *)&v + sizeof a, sizeof b);
    const NAME(hivec) gt = (NAME(hivec))(a > b);
    a = (NAME(hvec))(((NAME(hivec))a & gt) | ((NAME(hivec))b & ~gt));
    REAL m = a[0];
    for (int l = 1; l < LANES / 2; l++) m = a[l] > m ? a[l] : m;
    return m;
}

static inline NAME(vec) NAME(splat)(REAL v) {
    NAME(vec) x = {0};
    return x + v;
}

/* lane-wise a < b ? a : b and a > b ? a : b (vector ?: is C++ only) */
static inline NAME(vec) NAME(vmin)(NAME(vec) a, NAME(vec) b) {
    const NAME(ivec) m = (NAME(ivec))(a < b);
    return (NAME(vec))(((NAME(ivec))a & m) | ((NAME(ivec))b & ~m));
}

static inline NAME(vec) NAME(vmax)(NAME(vec) a, NAME(vec) b) {
    const NAME(ivec) m = (NAME(ivec))(a > b);
    return (NAME(vec))(((NAME(ivec))a & m) | ((NAME(ivec))b & ~m));
}

/* exp(x), x <= EXP_MAX: 2^n * Taylor(r) with |r| <= ln2/2 (see EXP_DEG); arguments below EXP_MIN give
 * exp(EXP_MIN) (~1e-38 / 1e-308), which no sum of probabilities notices */
static inline NAME(vec) NAME(vexp)(NAME(vec) x) {
    typedef NAME(vec) vec;
    typedef NAME(ivec) ivec;
    x = NAME(vmax)(x, NAME(splat)((REAL)EXP_MIN));
    const vec magic = NAME(splat)((REAL)EXP_MAGIC); /* 1.5 * 2^mantissa: t's low bits hold round(x/ln2) */
    const vec t = x * (REAL)1.44269504088896340736 + magic;
    const ivec n = (ivec)t - (ivec)magic;
    const vec nf = t - magic;
    const vec r = x - nf * (REAL)LN2_HI - nf * (REAL)LN2_LO;
    /* Horner on the Taylor coefficients 1/k!, k = EXP_DEG .. 0 */
    REAL c = 1;
    for (int k = 2; k <= EXP_DEG; k++) c /= k;
    vec p = NAME(splat)(c);
    for (int k = EXP_DEG; k >= 1; k--) {
        c *= k; /* 1/(k-1)! */
        p = p * r + c;
    }
    const ivec sb = (n + EXP_BIAS) << EXP_MANT;
    return p * (vec)sb;
}

/* tanh: odd Taylor series below TANH_SMALL (where 1 - exp(-2|y|) would cancel), (1 - e) / (1 + e) above */
static inline NAME(vec) NAME(vtanh)(NAME(vec) y) {
    typedef NAME(vec) vec;
    typedef NAME(ivec) ivec;
    const vec ay = NAME(vmax)(y, -y);
    const vec e = NAME(vexp)(-2 * ay);
    const vec big = (1 - e) / (1 + e);
    const vec y2 = ay * ay;
    const vec small = ay * (1 + y2 * (-(REAL)1 / 3 + y2 * ((REAL)2 / 15 + y2 * (-(REAL)17 / 315
                      + y2 * ((REAL)62 / 2835 + y2 * (-(REAL)1382 / 155925))))));
    const ivec lt = (ivec)(ay < (REAL)TANH_SMALL);
    const vec t = (vec)(((ivec)small & lt) | ((ivec)big & ~lt));
    const ivec neg = (ivec)(y < 0);
    return (vec)(((ivec)-t & neg) | ((ivec)t & ~neg));
}

/* lanes of vector v (entries v*LANES ..) that lie before n: all ones, else zero */
static inline NAME(ivec) NAME(valid)(int64_t v, int64_t n) {
    NAME(ivec) iota;
    for (int l = 0; l < LANES; l++) iota[l] = (IREAL)l;
    return iota < (IREAL)(n - v * LANES);
}

/* One row of probabilities over n keys, written to p (whole vectors, padding lanes exactly 0):
 *   z = (s + a x + b y) * rho   (x, y, rho may be NULL: left out; rho either per key or the scalar rho_c)
 *   z = cap * tanh(z / cap)     (cap > 0)
 *   p = softmax(z)
 * s, x, y and a per-key rho are read in whole vectors: each must have LANES - 1 readable entries past n. */
static inline void NAME(row_softmax)(REAL *restrict p, int64_t n, const REAL *s, const REAL *x, const REAL *y,
                                     REAL a, REAL b, const REAL *rho, REAL rho_c, REAL cap) {
    typedef NAME(vec) vec;
    typedef NAME(uvec) uvec;
    typedef NAME(ivec) ivec;
    const int64_t nv = (n + LANES - 1) / LANES;
    const vec fill = NAME(splat)((REAL)NEG_FILL);
    vec mx = fill;
    for (int64_t v = 0; v < nv; v++) {
        const int64_t o = v * LANES;
        vec z = *(const uvec *)(s + o);
        if (x) z += a * *(const uvec *)(x + o) + b * *(const uvec *)(y + o);
        if (rho) z *= *(const uvec *)(rho + o);
        else if (rho_c != 1) z *= rho_c;
        if (cap > 0) z = cap * NAME(vtanh)(z / cap);
        const ivec ok = NAME(valid)(v, n);
        z = (vec)(((ivec)z & ok) | ((ivec)fill & ~ok));
        *(vec *)(p + o) = z;
        mx = NAME(vmax)(mx, z);
    }
    const vec mv = NAME(splat)(NAME(hmax)(mx));
    vec acc = {0};
    for (int64_t v = 0; v < nv; v++) {
        const int64_t o = v * LANES;
        const vec e = (vec)((ivec)NAME(vexp)(*(const vec *)(p + o) - mv) & NAME(valid)(v, n));
        *(vec *)(p + o) = e;
        acc += e;
    }
    const vec inv = NAME(splat)(1 / NAME(hsum)(acc));
    for (int64_t v = 0; v < nv; v++) *(vec *)(p + v * LANES) *= inv;
}

int64_t NAME(sn_qk)(int64_t i0, int64_t i1, int64_t n_sub, int64_t d, int64_t r, int64_t rp, int64_t tri,
                    int64_t sub_cols, double cap_d,
                    SN_QK_INPUTS,
                    REAL *work, int64_t work_len) {
    typedef NAME(vec) vec;
    typedef NAME(uvec) uvec;
    const REAL cap = (REAL)cap_d;
    if (rp % (2 * LANES) != 0 || r > rp) return -1;
    if (((uintptr_t)work) % sizeof(vec) != 0) return -3;
    for (int64_t it = i0; it < i1; it++) {
        const int64_t lo = lo_[it], hi = hi_[it], n = hi - lo, M = n * n_sub;
        const int64_t np = (n + LANES - 1) / LANES * LANES;
        REAL *o = out + out_off[it];
        if (n <= 0) {
            for (int64_t j = 0; j < d; j++) o[j] = 0;
            continue;
        }
        /* workspace (vector-aligned pieces): unperturbed probabilities (n_sub rows of np), BLK rows of
         * dP (M each, rounded to whole vectors), one logit row (np) */
        const int64_t Mp = (M + LANES - 1) / LANES * LANES;
        if (n_sub * np + BLK * Mp + np > work_len) return -2;
        REAL *P0 = work, *pb = work + n_sub * np, *z = pb + BLK * Mp;
        const REAL *Sb = S + S_off[it] + lo;
        for (int64_t i = 0; i < n_sub; i++)
            NAME(row_softmax)(P0 + i * np, n, Sb + i * S_si, 0, 0, 0, 0, 0, 1, cap);
        const REAL *Ab = A + A_off[it], *Bb = Bc + A_off[it];
        const REAL *Fb = F + F_off[it] + lo * n_sub * rp;
        const int64_t row0 = lo * n_sub; /* F's first row used */
        /* with a triangular F, columns at or past hi * n_sub are zero in every used row */
        int64_t cols = tri ? (hi * n_sub < r ? hi * n_sub : r) : r;
        cols = (cols + 2 * LANES - 1) / (2 * LANES) * (2 * LANES);
        for (int64_t j0 = 0; j0 < d; j0 += BLK) {
            const int64_t nb = d - j0 < BLK ? d - j0 : BLK;
            for (int64_t jj = 0; jj < BLK; jj++) {
                REAL *dp = pb + jj * Mp;
                if (jj >= nb) {
                    memset(dp, 0, M * sizeof(REAL));
                    continue;
                }
                const int64_t j = j0 + jj;
                const REAL *x = X + X_off[it] + j * X_sj + lo, *y = Y + X_off[it] + j * X_sj + lo;
                const REAL *rh = R ? R + R_off[it] + j * R_sj + lo * R_ss : 0;
                for (int64_t i = 0; i < n_sub; i++) {
                    const REAL a = Ab[j * A_sj + i * A_si], b = Bb[j * A_sj + i * A_si];
                    NAME(row_softmax)(z, n, Sb + i * S_si, x, y, a, b, rh && R_ss ? rh : 0, rh && !R_ss ? rh[0] : 1,
                                      cap);
                    const REAL *p0 = P0 + i * np;
                    if (n_sub == 1) {
                        for (int64_t v = 0; v < np; v += LANES)
                            *(vec *)(dp + v) = *(const vec *)(z + v) - *(const vec *)(p0 + v);
                    } else {
                        for (int64_t s = 0; s < n; s++) dp[s * n_sub + i] = z[s] - p0[s];
                    }
                }
            }
            /* u_jj = dP_jj F over 2-vector column tiles, BLK channels per pass over F */
            vec ss[BLK];
            memset(ss, 0, sizeof(ss));
            for (int64_t c0 = 0; c0 < cols; c0 += 2 * LANES) {
                vec acc[BLK][2];
                memset(acc, 0, sizeof(acc));
                /* a triangular F has no entries in columns >= c0 in rows < c0; with sub_cols, sub-row i
                 * has none in columns >= (i + 1) * sub_cols */
                const int64_t m0 = tri && c0 > row0 ? c0 - row0 : 0;
                const int64_t i_min = !tri && sub_cols > 0 ? c0 / sub_cols : 0;
                for (int64_t s = m0 / n_sub; s < n; s++) {
                    for (int64_t i = i_min; i < n_sub; i++) {
                        const int64_t m = s * n_sub + i;
                        if (m < m0) continue;
                        const REAL *f = Fb + m * rp + c0;
                        const vec f0 = *(const uvec *)f, f1 = *(const uvec *)(f + LANES);
                        for (int64_t jj = 0; jj < BLK; jj++) {
                            const REAL pv = pb[jj * Mp + m];
                            acc[jj][0] += pv * f0;
                            acc[jj][1] += pv * f1;
                        }
                    }
                }
                for (int64_t jj = 0; jj < BLK; jj++) ss[jj] += acc[jj][0] * acc[jj][0] + acc[jj][1] * acc[jj][1];
            }
            for (int64_t jj = 0; jj < nb; jj++) o[j0 + jj] = sqrt(NAME(hsum)(ss[jj]));
        }
    }
    return 0;
}

/* All items, split into n_pieces ranges (bounds[0..n_pieces]) shared out dynamically over the OpenMP
 * threads, thread t using work + t * work_len (n_work_rows such rows). Built with OpenMP, this runs on the
 * OpenMP runtime torch already loaded (same libgomp.so.1), so it reuses torch's threads; without it, one
 * thread does everything. */
int64_t NAME(sn_qk_par)(int64_t n_pieces, const int64_t *bounds, int64_t n_work_rows,
                        int64_t n_sub, int64_t d, int64_t r, int64_t rp, int64_t tri, int64_t sub_cols,
                        double cap_d,
                        SN_QK_INPUTS,
                        REAL *work, int64_t work_len) {
    int64_t err = 0;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t p = 0; p < n_pieces; p++) {
        const int64_t t = SN_THREAD_NUM();
        const int64_t c = t >= n_work_rows ? -4
            : NAME(sn_qk)(bounds[p], bounds[p + 1], n_sub, d, r, rp, tri, sub_cols, cap_d, SN_QK_INPUT_NAMES,
                          work + t * work_len, work_len);
        if (c) {
#pragma omp atomic write
            err = c;
        }
    }
    return err;
}

#undef SN_QK_INPUTS
#undef SN_QK_INPUT_NAMES
