/*
 * blockio: deterministic block writer/verifier for the vmrepl test guest.
 *
 * The same static binary runs inside the guest (as /bin/blockio) and on the
 * host (as $VMREPL_CACHE/blockio) to check images after they were converted
 * to raw. The block format is documented in docs/test-guest.md; keep the two
 * in sync.
 *
 * Block i (4096 bytes, at byte offset i * 4096):
 *   [0..8)       magic "VMRBLK01"
 *   [8..16)      u64 LE block index i (absolute, counted from offset 0)
 *   [16..24)     u64 LE generation
 *   [24..32)     u64 LE tag (per-disk tag, default 0)
 *   [32..4088)   507 u64 LE filler words: splitmix64 stream seeded with
 *                i*0x9E3779B97F4A7C15 ^ gen*0xC2B2AE3D27D4EB4F ^ tag
 *   [4088..4096) u64 LE FNV-1a 64 of bytes [0..4088)
 *
 * Commands:
 *   blockio write DEV[,DEV...] --blocks N --from-gen A|auto [--to-gen B]
 *                 [--interval-ms M] [--start-block S] [--tag T] [--register DIR]
 *   blockio verify DEV --blocks N [--gen G | --min-gen G] [--start-block S]
 *                 [--tag T] [--allow-zero]
 *   blockio powerbutton [--register DIR]
 *
 * write: SIGTERM/SIGINT stop at the end of the generation in progress. SIGUSR1 asks for a
 * quiesce: the generation in progress is finished on every disk (each fdatasync'ed), then
 * the writer creates DIR/quiesced.PID (with --register DIR) holding the last complete
 * generation ("-" if none yet) and writes nothing until SIGUSR2, which removes the marker
 * and continues with the next generation. The latest of SIGUSR1/SIGUSR2 wins. A writer that
 * registers while DIR/frozen exists quiesces before its first generation.
 *
 * Output lines (stdout, one write() each so they stay whole on the console):
 *   VMREPL WROTE dev=DEV gen=G
 *   VMREPL STOPPED dev=DEV gen=G        (write stopped by SIGTERM/SIGINT)
 *   VMREPL QUIESCED dev=DEV gen=G|-     (SIGUSR1: quiesced; printed before the marker exists)
 *   VMREPL RESUMED dev=DEV              (SIGUSR2: printed before the marker is removed)
 *   VMREPL VERIFY dev=DEV blocks=N ok=K bad=B zero=Z min_gen=x max_gen=y result=pass|fail
 *   VMREPL BADBLOCK dev=DEV block=I reason=...   (first 8 bad blocks)
 *   VMREPL POWERDOWN                     (power button pressed)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <linux/input.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BLK 4096
#define MAGIC "VMRBLK01"
#define FILL_OFF 32
#define SUM_OFF (BLK - 8)
#define CHUNK 64 /* blocks per I/O */

static volatile sig_atomic_t stop_requested;
static volatile sig_atomic_t quiesce_requested; /* SIGUSR1 sets, SIGUSR2 clears */

static void say(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    ssize_t off = 0;
    while (off < n) {
        ssize_t w = write(1, buf + off, n - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        off += w;
    }
}

static void die(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "blockio: %s\n", buf);
    exit(2);
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t fnv1a64(const unsigned char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void fill_block(unsigned char *b, uint64_t idx, uint64_t gen, uint64_t tag)
{
    memcpy(b, MAGIC, 8);
    put64(b + 8, idx);
    put64(b + 16, gen);
    put64(b + 24, tag);
    uint64_t s = idx * 0x9E3779B97F4A7C15ULL ^ gen * 0xC2B2AE3D27D4EB4FULL ^ tag;
    for (int off = FILL_OFF; off < SUM_OFF; off += 8)
        put64(b + off, splitmix64(&s));
    put64(b + SUM_OFF, fnv1a64(b, SUM_OFF));
}

/* Display name: the argument with a leading "/dev/" removed. */
static const char *dname(const char *path)
{
    return strncmp(path, "/dev/", 5) == 0 ? path + 5 : path;
}

static int open_dev(const char *path, int write_mode, int *direct)
{
    int flags = (write_mode ? O_RDWR : O_RDONLY) | O_CLOEXEC;
    if (write_mode)
        flags |= O_CREAT; /* regular files on the host may not exist yet */
    int fd = open(path, flags | O_DIRECT, 0644);
    if (fd >= 0) {
        *direct = 1;
        return fd;
    }
    fd = open(path, flags, 0644);
    if (fd < 0)
        die("open %s: %s", path, strerror(errno));
    *direct = 0;
    return fd;
}

static void check_size(int fd, const char *path, uint64_t end_block, int write_mode)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        die("stat %s: %s", path, strerror(errno));
    uint64_t size = 0;
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, &size) < 0)
            die("BLKGETSIZE64 %s: %s", path, strerror(errno));
    } else if (S_ISREG(st.st_mode)) {
        (void)write_mode;
        return; /* regular files grow on write; on read, bytes past EOF count as zero */
    } else {
        return;
    }
    if (size < end_block * BLK)
        die("%s: size %" PRIu64 " bytes is smaller than %" PRIu64 " blocks of %d",
            path, size, end_block, BLK);
}

static ssize_t full_pread(int fd, void *buf, size_t n, off_t off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, (char *)buf + done, n - done, off + done);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0)
            break;
        done += r;
    }
    return done;
}

static int full_pwrite(int fd, const void *buf, size_t n, off_t off)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = pwrite(fd, (const char *)buf + done, n - done, off + done);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        done += r;
    }
    return 0;
}

static uint64_t parse_u64(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end || !*s)
        die("bad %s: '%s'", what, s);
    return v;
}

static void on_stop(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static void on_quiesce(int sig)
{
    quiesce_requested = sig == SIGUSR1;
}

/* Blocks the signals whose handlers set the loop flags (so a flag check and the following
 * wait cannot race with them); *old receives the previous mask for sigsuspend/ppoll. */
static void block_flag_signals(sigset_t *old)
{
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGTERM);
    sigaddset(&s, SIGINT);
    sigaddset(&s, SIGUSR1);
    sigaddset(&s, SIGUSR2);
    sigprocmask(SIG_BLOCK, &s, old);
}

/* ---- verify (also used by write --from-gen auto) ---- */

struct vstats {
    uint64_t ok, bad, zero, min_gen, max_gen, valid;
};

static void scan(const char *path, uint64_t start, uint64_t nblocks, uint64_t tag, int gen_mode,
                 uint64_t want_gen, int report, struct vstats *st)
{
    int direct;
    int fd = open_dev(path, 0, &direct);
    check_size(fd, path, start + nblocks, 0);
    unsigned char *buf, *exp;
    if (posix_memalign((void **)&buf, BLK, (size_t)CHUNK * BLK) ||
        posix_memalign((void **)&exp, BLK, BLK))
        die("out of memory");
    memset(st, 0, sizeof *st);
    st->min_gen = UINT64_MAX;
    int reported = 0;
    for (uint64_t i = 0; i < nblocks; i += CHUNK) {
        uint64_t n = nblocks - i < CHUNK ? nblocks - i : CHUNK;
        off_t off = (off_t)((start + i) * BLK);
        ssize_t got = full_pread(fd, buf, n * BLK, off);
        if (got < 0)
            die("read %s at %lld: %s", path, (long long)off, strerror(errno));
        if ((size_t)got < n * BLK) /* short file: treat the rest as zero */
            memset(buf + got, 0, n * BLK - got);
        for (uint64_t k = 0; k < n; k++) {
            unsigned char *b = buf + k * BLK;
            uint64_t idx = start + i + k;
            const char *reason = NULL;
            int is_zero = 0;
            if (memcmp(b, MAGIC, 8) != 0) {
                int allz = 1;
                for (int j = 0; j < BLK; j++)
                    if (b[j]) {
                        allz = 0;
                        break;
                    }
                if (allz) {
                    is_zero = 1;
                    reason = "zero";
                } else {
                    reason = "magic";
                }
            } else if (get64(b + SUM_OFF) != fnv1a64(b, SUM_OFF)) {
                reason = "checksum";
            } else if (get64(b + 8) != idx) {
                reason = "index";
            } else if (get64(b + 24) != tag) {
                reason = "tag";
            } else {
                uint64_t g = get64(b + 16);
                fill_block(exp, idx, g, tag);
                if (memcmp(exp, b, BLK) != 0) {
                    reason = "filler";
                } else {
                    st->valid++;
                    if (g < st->min_gen)
                        st->min_gen = g;
                    if (g > st->max_gen)
                        st->max_gen = g;
                    if (gen_mode == 1 && g != want_gen)
                        reason = "gen";
                    else if (gen_mode == 2 && g < want_gen)
                        reason = "gen";
                }
            }
            if (!reason) {
                st->ok++;
            } else if (is_zero) {
                st->zero++;
            } else {
                st->bad++;
            }
            if (reason && !is_zero && report && reported < 8) {
                reported++;
                if (strcmp(reason, "gen") == 0)
                    say("VMREPL BADBLOCK dev=%s block=%" PRIu64 " reason=gen gen=%" PRIu64,
                        dname(path), idx, get64(b + 16));
                else
                    say("VMREPL BADBLOCK dev=%s block=%" PRIu64 " reason=%s", dname(path), idx,
                        reason);
            }
        }
    }
    free(buf);
    free(exp);
    close(fd);
}

static int cmd_verify(int argc, char **argv)
{
    const char *dev = NULL;
    uint64_t nblocks = 0, start = 0, tag = 0, want = 0;
    int have_blocks = 0, gen_mode = 0, allow_zero = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--blocks") && v) {
            nblocks = parse_u64(v, "--blocks"), have_blocks = 1, i++;
        } else if (!strcmp(a, "--gen") && v) {
            want = parse_u64(v, "--gen"), gen_mode = 1, i++;
        } else if (!strcmp(a, "--min-gen") && v) {
            want = parse_u64(v, "--min-gen"), gen_mode = 2, i++;
        } else if (!strcmp(a, "--start-block") && v) {
            start = parse_u64(v, "--start-block"), i++;
        } else if (!strcmp(a, "--tag") && v) {
            tag = parse_u64(v, "--tag"), i++;
        } else if (!strcmp(a, "--allow-zero")) {
            allow_zero = 1;
        } else if (a[0] != '-' && !dev) {
            dev = a;
        } else {
            die("verify: unexpected argument '%s'", a);
        }
    }
    if (!dev || !have_blocks)
        die("usage: blockio verify DEV --blocks N [--gen G | --min-gen G] [--start-block S] "
            "[--tag T] [--allow-zero]");
    struct vstats st;
    scan(dev, start, nblocks, tag, gen_mode, want, 1, &st);
    int pass = st.bad == 0 && (allow_zero || st.zero == 0);
    char mn[32], mx[32];
    if (st.valid) {
        snprintf(mn, sizeof mn, "%" PRIu64, st.min_gen);
        snprintf(mx, sizeof mx, "%" PRIu64, st.max_gen);
    } else {
        strcpy(mn, "-");
        strcpy(mx, "-");
    }
    say("VMREPL VERIFY dev=%s blocks=%" PRIu64 " ok=%" PRIu64 " bad=%" PRIu64 " zero=%" PRIu64
        " min_gen=%s max_gen=%s result=%s",
        dname(dev), nblocks, st.ok, st.bad, st.zero, mn, mx, pass ? "pass" : "fail");
    return pass ? 0 : 1;
}

/* ---- write ---- */

static char regfile[256];

static void unregister(void)
{
    if (regfile[0])
        unlink(regfile);
}

/* Sleeps up to ms milliseconds; returns early on a stop or quiesce request. */
static void sleep_ms(uint64_t ms)
{
    struct timespec now, end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += (time_t)(ms / 1000);
    end.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (end.tv_nsec >= 1000000000L)
        end.tv_sec++, end.tv_nsec -= 1000000000L;
    sigset_t old;
    block_flag_signals(&old);
    while (!stop_requested && !quiesce_requested) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        struct timespec left = {end.tv_sec - now.tv_sec, end.tv_nsec - now.tv_nsec};
        if (left.tv_nsec < 0)
            left.tv_sec--, left.tv_nsec += 1000000000L;
        if (left.tv_sec < 0)
            break;
        ppoll(NULL, 0, &left, &old); /* signals unblocked only while waiting */
    }
    sigprocmask(SIG_SETMASK, &old, NULL);
}

/* At a generation boundary (every disk holds generation `last`, fdatasync'ed): if a
 * quiesce was requested, announce it, create the marker and wait for SIGUSR2 (or a stop). */
static void quiesce(const char *regdir, int ndev, char **names, int wrote_any, uint64_t last)
{
    sigset_t old;
    block_flag_signals(&old);
    if (quiesce_requested && !stop_requested) {
        char gen[32], marker[300], tmp[300];
        if (wrote_any)
            snprintf(gen, sizeof gen, "%" PRIu64, last);
        else
            strcpy(gen, "-");
        for (int d = 0; d < ndev; d++)
            say("VMREPL QUIESCED dev=%s gen=%s", dname(names[d]), gen);
        marker[0] = 0;
        if (regdir) {
            /* written under a temporary name and renamed: readers never see it half-written */
            snprintf(marker, sizeof marker, "%s/quiesced.%d", regdir, (int)getpid());
            snprintf(tmp, sizeof tmp, "%s/.quiesced.%d.tmp", regdir, (int)getpid());
            int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
            if (fd < 0)
                die("create %s: %s", tmp, strerror(errno));
            char line[40];
            int n = snprintf(line, sizeof line, "%s\n", gen);
            if (write(fd, line, n) != n || close(fd) < 0 || rename(tmp, marker) < 0)
                die("write %s: %s", marker, strerror(errno));
        }
        while (quiesce_requested && !stop_requested)
            sigsuspend(&old);
        if (!stop_requested)
            for (int d = 0; d < ndev; d++)
                say("VMREPL RESUMED dev=%s", dname(names[d]));
        if (marker[0])
            unlink(marker);
    }
    sigprocmask(SIG_SETMASK, &old, NULL);
}

static int cmd_write(int argc, char **argv)
{
    char *devs = NULL;
    uint64_t nblocks = 0, start = 0, tag = 0, from = 0, to = UINT64_MAX, interval = 0;
    int have_blocks = 0, have_from = 0, from_auto = 0;
    const char *regdir = NULL;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--blocks") && v) {
            nblocks = parse_u64(v, "--blocks"), have_blocks = 1, i++;
        } else if (!strcmp(a, "--from-gen") && v) {
            if (!strcmp(v, "auto"))
                from_auto = 1;
            else
                from = parse_u64(v, "--from-gen");
            have_from = 1, i++;
        } else if (!strcmp(a, "--to-gen") && v) {
            to = !strcmp(v, "inf") ? UINT64_MAX : parse_u64(v, "--to-gen"), i++;
        } else if (!strcmp(a, "--interval-ms") && v) {
            interval = parse_u64(v, "--interval-ms"), i++;
        } else if (!strcmp(a, "--start-block") && v) {
            start = parse_u64(v, "--start-block"), i++;
        } else if (!strcmp(a, "--tag") && v) {
            tag = parse_u64(v, "--tag"), i++;
        } else if (!strcmp(a, "--register") && v) {
            regdir = v, i++;
        } else if (a[0] != '-' && !devs) {
            devs = strdup(a);
        } else {
            die("write: unexpected argument '%s'", a);
        }
    }
    if (!devs || !have_blocks || !have_from)
        die("usage: blockio write DEV[,DEV...] --blocks N --from-gen A|auto [--to-gen B|inf] "
            "[--interval-ms M] [--start-block S] [--tag T] [--register DIR]");

    char *names[16];
    int fds[16], ndev = 0;
    for (char *save = NULL, *t = strtok_r(devs, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (ndev == 16)
            die("too many devices");
        names[ndev++] = t;
    }
    if (from_auto) {
        /* continue after the highest valid generation found on any of the devices */
        uint64_t max = 0;
        for (int d = 0; d < ndev; d++) {
            struct vstats st;
            if (access(names[d], F_OK) != 0)
                continue;
            scan(names[d], start, nblocks, tag, 0, 0, 0, &st);
            if (st.valid && st.max_gen > max)
                max = st.max_gen;
        }
        from = max + 1;
    }
    for (int d = 0; d < ndev; d++) {
        int direct;
        fds[d] = open_dev(names[d], 1, &direct);
        check_size(fds[d], names[d], start + nblocks, 1);
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = on_quiesce;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    sigaction(SIGUSR2, &sa, NULL);
    if (regdir) {
        /* handlers first: a registered writer may get SIGUSR1 at any time */
        mkdir(regdir, 0755);
        snprintf(regfile, sizeof regfile, "%s/writer.%d", regdir, (int)getpid());
        int rfd = open(regfile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (rfd >= 0)
            close(rfd);
        else
            regfile[0] = 0;
        atexit(unregister);
        /* registered during a freeze (the hook listed the writers before we were there)? */
        char frozen[300];
        snprintf(frozen, sizeof frozen, "%s/frozen", regdir);
        sigset_t old;
        block_flag_signals(&old); /* a SIGUSR2 arriving now must win over this check */
        if (access(frozen, F_OK) == 0)
            quiesce_requested = 1;
        sigprocmask(SIG_SETMASK, &old, NULL);
    }

    unsigned char *buf;
    if (posix_memalign((void **)&buf, BLK, (size_t)CHUNK * BLK))
        die("out of memory");
    uint64_t last = 0;
    int wrote_any = 0;
    for (uint64_t g = from; g <= to && !stop_requested; g++) {
        if (quiesce_requested) { /* at a generation boundary */
            quiesce(regdir, ndev, names, wrote_any, last);
            if (stop_requested)
                break;
        }
        for (int d = 0; d < ndev; d++) {
            for (uint64_t i = 0; i < nblocks; i += CHUNK) {
                uint64_t n = nblocks - i < CHUNK ? nblocks - i : CHUNK;
                for (uint64_t k = 0; k < n; k++)
                    fill_block(buf + k * BLK, start + i + k, g, tag);
                if (full_pwrite(fds[d], buf, n * BLK, (off_t)((start + i) * BLK)) < 0)
                    die("write %s: %s", names[d], strerror(errno));
            }
            if (fdatasync(fds[d]) < 0)
                die("fdatasync %s: %s", names[d], strerror(errno));
            say("VMREPL WROTE dev=%s gen=%" PRIu64, dname(names[d]), g);
        }
        last = g, wrote_any = 1;
        if (g == to) /* also ends the loop at UINT64_MAX */
            break;
        if (interval)
            sleep_ms(interval);
    }
    for (int d = 0; d < ndev; d++)
        close(fds[d]);
    if (stop_requested)
        for (int d = 0; d < ndev; d++) {
            if (wrote_any)
                say("VMREPL STOPPED dev=%s gen=%" PRIu64, dname(names[d]), last);
            else
                say("VMREPL STOPPED dev=%s gen=-", dname(names[d]));
        }
    free(buf);
    return 0;
}

/* ---- power button ---- */

#define BITS_PER_LONG (sizeof(long) * 8)
#define NLONGS(x) (((x) + BITS_PER_LONG - 1) / BITS_PER_LONG)

static int has_power_key(int fd)
{
    unsigned long bits[NLONGS(KEY_MAX + 1)];
    memset(bits, 0, sizeof bits);
    if (ioctl(fd, EVIOCGBIT(EV_KEY, sizeof bits), bits) < 0)
        return 0;
    return (bits[KEY_POWER / BITS_PER_LONG] >> (KEY_POWER % BITS_PER_LONG)) & 1;
}

static void stop_writers(const char *regdir)
{
    /* ask registered writers to finish their current generation, wait up to 20 s */
    for (int round = 0; round < 200; round++) {
        DIR *d = opendir(regdir);
        if (!d)
            return;
        int alive = 0;
        struct dirent *e;
        while ((e = readdir(d))) {
            if (strncmp(e->d_name, "writer.", 7))
                continue;
            int pid = atoi(e->d_name + 7);
            if (pid <= 1)
                continue;
            if (kill(pid, round == 0 ? SIGTERM : 0) == 0 || errno == EPERM) {
                alive++;
            } else {
                char p[512];
                snprintf(p, sizeof p, "%s/%s", regdir, e->d_name);
                unlink(p);
            }
        }
        closedir(d);
        if (!alive)
            return;
        usleep(100000);
    }
}

static int cmd_powerbutton(int argc, char **argv)
{
    const char *regdir = NULL;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--register") && i + 1 < argc)
            regdir = argv[++i];
        else
            die("powerbutton: unexpected argument '%s'", argv[i]);
    }
    struct pollfd pfd[32];
    int n = 0;
    for (;;) {
        if (n == 0) {
            for (int i = 0; i < 32 && n < 32; i++) {
                char p[64];
                snprintf(p, sizeof p, "/dev/input/event%d", i);
                int fd = open(p, O_RDONLY | O_CLOEXEC);
                if (fd < 0)
                    continue;
                if (has_power_key(fd)) {
                    pfd[n].fd = fd;
                    pfd[n].events = POLLIN;
                    n++;
                } else {
                    close(fd);
                }
            }
            if (n == 0) {
                sleep(1);
                continue;
            }
        }
        int r = poll(pfd, n, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("poll: %s", strerror(errno));
        }
        for (int i = 0; i < n; i++) {
            if (!(pfd[i].revents & POLLIN))
                continue;
            struct input_event ev[16];
            ssize_t got = read(pfd[i].fd, ev, sizeof ev);
            if (got <= 0)
                continue;
            for (size_t k = 0; k < (size_t)got / sizeof ev[0]; k++) {
                if (ev[k].type == EV_KEY && ev[k].code == KEY_POWER && ev[k].value == 1) {
                    say("VMREPL POWERDOWN");
                    if (regdir)
                        stop_writers(regdir);
                    sync();
                    say("VMREPL POWEROFF");
                    execl("/bin/poweroff", "poweroff", "-f", (char *)NULL);
                    reboot(RB_POWER_OFF);
                    die("poweroff failed: %s", strerror(errno));
                }
            }
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: blockio write|verify|powerbutton ... (see docs/test-guest.md)\n");
        return 2;
    }
    if (!strcmp(argv[1], "write"))
        return cmd_write(argc - 2, argv + 2);
    if (!strcmp(argv[1], "verify"))
        return cmd_verify(argc - 2, argv + 2);
    if (!strcmp(argv[1], "powerbutton"))
        return cmd_powerbutton(argc - 2, argv + 2);
    die("unknown command '%s'", argv[1]);
    return 2;
}
