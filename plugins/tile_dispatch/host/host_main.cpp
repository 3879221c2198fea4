// Runs tile_dispatch_kernel on the CPU (see cuda_host.h) for tests on machines without a GPU.
// Built by prism_deploy/kernel/host.py with the same -DPRISM_... defines NVRTC gets, plus
// -include cuda_host.h. Usage:
//   tile_dispatch_host GRID_X GRID_Y BLOCK_X SHARED_BYTES T IN_DIM end|start DIR
// DIR holds hidden.bin, scores.bin, tiles.bin, scales.bin (raw, C order) and, optionally,
// unread_workers.txt (worker ids whose tiles the kernel must not touch) and count_reads (an
// empty file: count the 16-byte loads of each 16-byte piece of the tiles, written to
// tile_reads.bin as uint32); out.bin is written there. Every buffer sits against an inaccessible page, flush with its end ("end") or its
// start ("start"), so an out-of-bounds access one element past either edge faults
// (SIGSEGV) instead of reading a neighbour. With "start", tiles of whole pages listed in
// unread_workers.txt are made inaccessible too: touching one faults. Exit 3 means a rule of
// cuda_host.h was broken (message on stderr).
#include "cuda_host.h"

#include <fstream>
#include <string>
#include <sys/mman.h>
#include <unistd.h>

#include "../tile_dispatch.cu"

namespace {

const std::size_t kPage = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));

// `bytes` of readable/writable memory with an inaccessible page on each side.
char* guarded(std::size_t bytes, bool flush_end) {
    const std::size_t pages = (bytes + kPage - 1) / kPage + (bytes == 0);
    char* base = static_cast<char*>(mmap(nullptr, (pages + 2) * kPage, PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base == MAP_FAILED) prism_host::fail("mmap failed");
    mprotect(base, kPage, PROT_NONE);
    mprotect(base + (pages + 1) * kPage, kPage, PROT_NONE);
    return flush_end ? base + (pages + 1) * kPage - bytes : base + kPage;
}

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) prism_host::fail(("cannot read " + path).c_str());
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

char* load(const std::string& path, bool flush_end, std::size_t* size = nullptr) {
    const std::string data = read_file(path);
    char* p = guarded(data.size(), flush_end);
    std::memcpy(p, data.data(), data.size());
    if (size) *size = data.size();
    return p;
}

struct Args {
    const hidden_t* hidden;
    const float* scores;
    const tile_t* tiles;
    const float* scales;
    int T;
    int in_dim;
    hidden_t* out;
};
Args g_args;

// 16-byte tile loads per 16-byte piece of the tiles buffer (count_reads).
const char* g_tiles_begin = nullptr;
std::size_t g_tiles_bytes = 0;
std::vector<std::uint32_t> g_tile_reads;

void count_tile_read(const void* p, std::size_t size) {
    const char* c = static_cast<const char*>(p);
    if (c < g_tiles_begin || c >= g_tiles_begin + g_tiles_bytes) return;
    if (size != 16) prism_host::fail("a tile load that is not 16 bytes wide");
    ++g_tile_reads[static_cast<std::size_t>(c - g_tiles_begin) / 16];
}

void thread_main() {
    prism_host::Block& b = prism_host::block();
    tile_dispatch_kernel(g_args.hidden, g_args.scores, g_args.tiles, g_args.scales, g_args.T, g_args.in_dim,
                         g_args.out);
    b.current->done = true;
    ++b.progress;
    _longjmp(b.scheduler, 1);  // never returns: the fiber's stack is reused by the next block
}

void run_block(unsigned bx, unsigned by, std::size_t shared_bytes, char* shared) {
    prism_host::Block& b = prism_host::block();
    b.block_idx = {bx, by, 0};
    // Shared memory is uninitialised on a GPU: NaN here, so reading an unwritten entry shows.
    float* f = reinterpret_cast<float*>(shared);
    for (std::size_t i = 0; i < shared_bytes / 4; ++i) f[i] = __int_as_float(0x7fc00000u);
    b.shared = shared;
    const unsigned n = b.block_dim.x;
    for (auto& bar : b.warp_barriers) bar = prism_host::Barrier{32, 0, 0};
    b.block_barrier = prism_host::Barrier{static_cast<int>(n), 0, 0};
    for (unsigned t = 0; t < n; ++t) {
        prism_host::Fiber& fb = b.fibers[t];
        fb.thread_idx = {t, 0, 0};
        fb.done = false;
        fb.started = false;
        getcontext(&fb.boot);
        fb.boot.uc_stack.ss_sp = fb.stack.data();
        fb.boot.uc_stack.ss_size = fb.stack.size();
        fb.boot.uc_link = nullptr;
        makecontext(&fb.boot, thread_main, 0);
    }
    for (;;) {
        bool live = false;
        const unsigned long long before = b.progress;
        for (unsigned t = 0; t < n; ++t) {
            prism_host::Fiber& fb = b.fibers[t];
            if (fb.done) continue;
            live = true;
            b.current = &fb;
            if (!_setjmp(b.scheduler)) {
                if (fb.started) _longjmp(fb.resume, 1);
                fb.started = true;
                setcontext(&fb.boot);
            }
        }
        if (!live) return;
        if (b.progress == before) {
            char msg[160];
            std::snprintf(msg, sizeof msg, "deadlock in block (%u, %u): threads wait at a barrier others never reach",
                          bx, by);
            prism_host::fail(msg);
        }
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 9) prism_host::fail("usage: GRID_X GRID_Y BLOCK_X SHARED_BYTES T IN_DIM end|start DIR");
    const unsigned grid_x = std::stoul(argv[1]), grid_y = std::stoul(argv[2]), block_x = std::stoul(argv[3]);
    const std::size_t shared_bytes = std::stoul(argv[4]);
    const int T = std::stoi(argv[5]), in_dim = std::stoi(argv[6]);
    const bool flush_end = std::string(argv[7]) == "end";
    const std::string dir = argv[8];
    if (block_x == 0 || block_x % 32 != 0) prism_host::fail("block size must be a positive multiple of 32");

    std::size_t tiles_bytes = 0;
    g_args.hidden = reinterpret_cast<const hidden_t*>(load(dir + "/hidden.bin", flush_end));
    g_args.scores = reinterpret_cast<const float*>(load(dir + "/scores.bin", flush_end));
    char* tiles = load(dir + "/tiles.bin", flush_end, &tiles_bytes);
    g_args.tiles = reinterpret_cast<const tile_t*>(tiles);
    g_args.scales = reinterpret_cast<const float*>(load(dir + "/scales.bin", flush_end));
    g_args.T = T;
    g_args.in_dim = in_dim;
    const std::size_t out_bytes = static_cast<std::size_t>(T) * OUT_DIM * sizeof(hidden_t);
    char* out = guarded(out_bytes, flush_end);
    std::memset(out, 0xff, out_bytes);  // NaN (float and half): an element nobody writes shows
    g_args.out = reinterpret_cast<hidden_t*>(out);

    std::ifstream unread(dir + "/unread_workers.txt");
    const std::size_t tile_bytes = static_cast<std::size_t>(TR) * TC * sizeof(tile_t);
    for (long w; unread >> w;) {
        if (flush_end || tile_bytes % kPage != 0) prism_host::fail("unread_workers needs 'start' and whole-page tiles");
        mprotect(tiles + w * tile_bytes, tile_bytes, PROT_NONE);
    }

    const bool count_reads = std::ifstream(dir + "/count_reads").good();
    if (count_reads) {
        g_tiles_begin = tiles;
        g_tiles_bytes = tiles_bytes;
        g_tile_reads.assign((tiles_bytes + 15) / 16, 0u);
        prism_host::load_hook = count_tile_read;
    }

    prism_host::Block& b = prism_host::block();
    b.block_dim = {block_x, 1, 1};
    b.grid_dim = {grid_x, grid_y, 1};
    b.fibers.resize(block_x);
    for (auto& fb : b.fibers) fb.stack.resize(256 * 1024);
    b.warp_barriers.resize(block_x / 32);
    b.warp_slots.resize(2 * block_x);
    char* shared = guarded(shared_bytes, true);
    for (unsigned by = 0; by < grid_y; ++by)
        for (unsigned bx = 0; bx < grid_x; ++bx) run_block(bx, by, shared_bytes, shared);

    if (count_reads) {
        std::ofstream r(dir + "/tile_reads.bin", std::ios::binary);
        r.write(reinterpret_cast<const char*>(g_tile_reads.data()),
                static_cast<std::streamsize>(g_tile_reads.size() * sizeof(std::uint32_t)));
        if (!r) return 4;
    }
    std::ofstream f(dir + "/out.bin", std::ios::binary);
    f.write(out, static_cast<std::streamsize>(out_bytes));
    return f ? 0 : 4;
}
