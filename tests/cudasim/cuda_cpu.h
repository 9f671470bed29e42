// CUDA C kernels on the CPU, for tests: the same kernel source CuPy compiles, built with g++ and run with one
// fiber (ucontext) per CUDA thread, scheduled cooperatively on one OS thread.
//
// Model (what the emulation guarantees, see tests/cudasim/__init__.py):
// - Blocks run one after another; inside a block every CUDA thread is a fiber with its own stack and registers
//   (locals), so per-thread state is real, and a fiber runs until it reaches a barrier or returns.
// - The fibers' run order is permuted (seeded) at every barrier round, and now and then a whole warp is held
//   back for up to 48 rounds while the others run ahead (as a GPU's warp scheduler may do): a kernel that
//   depends on the order threads reach or leave a barrier, or on warps staying in step, gives wrong results.
// - __shared__ becomes a function-level `static`: one copy, shared by the block's threads (blocks never overlap).
// - __syncthreads() waits for every thread of the block that has not returned from the kernel (as on the GPU,
//   where exited threads no longer count). A barrier some threads can never reach (a __syncthreads inside
//   divergent code, which hangs or corrupts on a GPU) is detected and aborts the launch with a message.
// - __shfl_down_sync(mask, v, delta) exchanges through a per-warp slot array between two warp barriers; lanes at
//   or past the warp's end return their own value (CUDA's rule for width 32). Every lane of the warp must call
//   it, as the full mask the kernels pass says.
// - Float arithmetic: host IEEE double/float with contraction off (-ffp-contract=off), so __fadd_rn/__fmul_rn
//   and the --fmad=false kernels round each operation as the GPU does. Transcendentals (exp) come from glibc,
//   within an ulp of CUDA's; that is the one documented difference.
// Not modelled: races between two barriers at instruction granularity (fibers switch only at barriers), the
// GPU's weak memory ordering, occupancy and timing.
#pragma once

#include <math.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline dim3 threadIdx;  // of the running fiber (one OS thread runs them all)
inline dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace cudasim {

struct Fiber {
    ucontext_t context;
    dim3 index;
    bool finished = false;
};

// The running block: its fibers and the scheduler's context.
struct Block {
    int threads = 0;
    std::vector<Fiber> fibers;
    std::vector<uint64_t> slots;  // one per thread: the value a lane offers in a shuffle
    ucontext_t scheduler;
    int current = -1;
    const std::function<void()>* kernel = nullptr;
};

inline Block* block = nullptr;

inline void yield() { swapcontext(&block->fibers[block->current].context, &block->scheduler); }

inline unsigned long progress = 0;  // bumped whenever a fiber arrives, a barrier releases or a fiber returns

// A barrier over the threads (of a block or a warp) that have not returned: a fiber arrives, then yields until
// the last live member has arrived. Arrivals count regardless of call site.
class Barrier {
   public:
    explicit Barrier(int members = 0) : live_(members) {}
    void arrive_and_wait() {
        const unsigned long generation = generation_;
        ++progress;
        if (++arrived_ >= live_) release();
        while (generation_ == generation) yield();
    }
    // A member returned from the kernel: the others may all be waiting already.
    void member_finished() {
        --live_;
        if (arrived_ > 0 && arrived_ >= live_) release();
    }

   private:
    void release() {
        arrived_ = 0;
        ++generation_;
        ++progress;
    }
    int live_;
    int arrived_ = 0;
    unsigned long generation_ = 0;
};

inline Barrier* block_barrier = nullptr;
inline std::vector<Barrier>* warp_barriers = nullptr;

inline void fiber_main() {
    (*block->kernel)();
    block->fibers[block->current].finished = true;
    swapcontext(&block->fibers[block->current].context, &block->scheduler);
}

}  // namespace cudasim

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { cudasim::block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_down_sync(unsigned /*mask: all lanes, as the kernels pass*/, T value, unsigned delta, int width = 32) {
    static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "8-byte values at most");
    cudasim::Block& b = *cudasim::block;
    const int tid = b.current, warp = tid / 32, lane = tid % 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    b.slots[tid] = bits;
    (*cudasim::warp_barriers)[warp].arrive_and_wait();  // every lane has offered its value
    T out = value;
    const int src = lane + static_cast<int>(delta);
    if (src < width && warp * 32 + src < b.threads) std::memcpy(&out, &b.slots[warp * 32 + src], sizeof(T));
    (*cudasim::warp_barriers)[warp].arrive_and_wait();  // every lane has read before any slot is overwritten
    return out;
}

inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }  // round half to even
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

// CUDA's integer min/max overloads (same-type operands, as the kernels use them).
template <typename T>
inline T min(T a, T b) {
    return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
    return a < b ? b : a;
}

namespace cudasim {

// Run `kernel` over `grid` x `block`, blocks in order, a fiber per thread; `seed` permutes the run order.
// Returns 0, or -1 when a barrier can never be released (the message is printed to stderr).
inline int launch(dim3 grid, dim3 threads, const std::function<void()>& kernel, unsigned seed) {
    const int n = static_cast<int>(threads.x * threads.y * threads.z);
    blockDim = threads;
    gridDim = grid;
    std::mt19937 rng(seed);
    std::vector<int> order(n);
    for (int t = 0; t < n; ++t) order[t] = t;
    constexpr size_t kStack = 64 * 1024;  // per fiber, allocated once per launch (untouched pages cost nothing)
    std::vector<std::unique_ptr<char[]>> stacks(n);
    for (auto& st : stacks) st.reset(new char[kStack]);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Block blk;
                blk.threads = n;
                blk.fibers.resize(n);
                blk.slots.resize(n);
                blk.kernel = &kernel;
                Barrier sync(n);
                std::vector<Barrier> warps;
                for (int w = 0; w * 32 < n; ++w) warps.emplace_back(std::min(32, n - 32 * w));
                block = &blk;
                block_barrier = &sync;
                warp_barriers = &warps;
                blockIdx = {bx, by, bz};
                for (int t = 0; t < n; ++t) {
                    Fiber& f = blk.fibers[t];
                    f.index = {t % threads.x, (t / threads.x) % threads.y, t / (threads.x * threads.y)};
                    getcontext(&f.context);
                    f.context.uc_stack.ss_sp = stacks[t].get();
                    f.context.uc_stack.ss_size = kStack;
                    f.context.uc_link = nullptr;
                    makecontext(&f.context, fiber_main, 0);
                }
                int live = n;
                std::vector<int> frozen(warps.size(), 0);  // passes a warp sits out (scheduling skew)
                while (live > 0) {
                    const unsigned long before = progress;
                    // Now and then a warp is descheduled for a while, as a GPU's warp scheduler may do, so the
                    // other warps run ahead of it: races between warps show up as wrong results.
                    if (warps.size() > 1 && rng() % 4 == 0) frozen[rng() % warps.size()] = 1 + rng() % 48;
                    std::shuffle(order.begin(), order.end(), rng);
                    bool skipped = false;
                    for (int t : order) {
                        Fiber& f = blk.fibers[t];
                        if (f.finished) continue;
                        if (frozen[t / 32] > 0) {
                            skipped = true;
                            continue;
                        }
                        blk.current = t;
                        threadIdx = f.index;
                        swapcontext(&blk.scheduler, &f.context);
                        if (f.finished) {
                            --live;
                            ++progress;
                            sync.member_finished();
                            warps[t / 32].member_finished();
                        }
                    }
                    for (int& k : frozen) k = k > 0 ? k - 1 : 0;
                    if (live > 0 && progress == before) {
                        if (skipped) {  // everyone else waits for the frozen warps: wake them
                            std::fill(frozen.begin(), frozen.end(), 0);
                            continue;
                        }
                        // Every live fiber is parked at a barrier that cannot open.
                        std::fprintf(stderr,
                                     "cudasim: block (%u,%u,%u): %d threads wait at a barrier the others never "
                                     "reach (a __syncthreads or __shfl_*_sync in divergent code)\n",
                                     bx, by, bz, live);
                        return -1;
                    }
                }
            }
    return 0;
}

// Kernel parameters as cuLaunchKernel takes them: an array of pointers to each argument's bytes.
template <typename T>
T param_as(void* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

template <typename... P, size_t... I>
void invoke(void (*f)(P...), void** params, std::index_sequence<I...>) {
    f(param_as<std::remove_cv_t<P>>(params[I])...);
}

template <typename... P>
void invoke(void (*f)(P...), void** params) {
    invoke(f, params, std::index_sequence_for<P...>{});
}

// Signature, for the host side to check what it passes: kind 'p' pointer, 'f' floating, 'i' integer; size.
template <typename... P>
int signature(void (*)(P...), char* kinds, int* sizes, int cap) {
    const char k[] = {(std::is_pointer<P>::value ? 'p' : std::is_floating_point<P>::value ? 'f' : 'i')..., 0};
    const int s[] = {static_cast<int>(sizeof(P))..., 0};
    const int n = static_cast<int>(sizeof...(P));
    for (int i = 0; i < n && i < cap; ++i) {
        kinds[i] = k[i];
        sizes[i] = s[i];
    }
    return n;
}

}  // namespace cudasim
