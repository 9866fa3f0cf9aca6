/*
 * livedump-guest: a tiny static helper run by the test guest's /init.
 *
 *   livedump-guest touch MIB     fill MIB MiB of anonymous memory with
 *                                non-zero data and keep it
 *   livedump-guest marker COUNT  place COUNT known ASCII strings, one per page
 *                                of anonymous memory, and print the
 *                                guest-physical address of each page
 *   livedump-guest cache MIB     write MIB MiB of files into /dev/shm (tmpfs:
 *                                page cache), about half compressible
 *
 * Either way the work is done in a child process that stays alive (sleeping)
 * afterwards, so the memory stays in use; the parent waits until the child has
 * finished its work and printed its report, then exits with the child's
 * status.  /init can thus run the helper synchronously.
 *
 * Lines printed on stdout (the serial console), parsed by linux_guest.py:
 *
 *   LIVEDUMP-TOUCH mib=N seconds=S mib_per_s=R
 *   LIVEDUMP-CACHE mib=N seconds=S mib_per_s=R
 *   LIVEDUMP-MARKER gpa=0xADDR text=LIVEDUMP-MARKER-<hex>-<i>
 *   LIVEDUMP-GUEST-ERROR <what went wrong>
 *
 * Guest-physical addresses come from /proc/self/pagemap: bit 63 says the page
 * is present and bits 0-54 are its page frame number (visible to root only).
 * The marker pages are kept from moving: madvise(MADV_NOHUGEPAGE) keeps
 * khugepaged from collapsing them into a huge page (a copy), and mlock() plus
 * /proc/sys/vm/compact_unevictable_allowed=0 (set by /init) keeps compaction
 * from migrating them.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define PAGEMAP_PRESENT (1ULL << 63)
#define PAGEMAP_PFN_MASK ((1ULL << 55) - 1)

static void fail(const char *fmt, ...)
{
	va_list ap;

	printf("LIVEDUMP-GUEST-ERROR ");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	if (errno)
		printf(": %s", strerror(errno));
	printf("\n");
	fflush(stdout);
	exit(1);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Anonymous, private memory of `size` bytes, with a transparent-huge-page
 * policy: huge pages make touching much faster under TCG, but must be avoided
 * where the physical address of each small page has to stay put. */
static unsigned char *anonymous(size_t size, int hugepage)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		fail("mmap of %zu bytes", size);
	/* Advice only: a failure (e.g. THP compiled out) is harmless. */
	madvise(p, size, hugepage ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
	return p;
}

/* Fill `mib` MiB with non-zero bytes: 0x5a everywhere, except that each page
 * starts with its own index (ORed with a tag, so never zero), so that no two
 * pages are identical. */
static int touch(unsigned long mib)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t size = (size_t)mib << 20;
	unsigned char *mem = anonymous(size, 1);
	double start = now(), seconds;

	for (size_t off = 0; off < size; off += page) {
		uint64_t tag = 0x4c44000000000000ULL | (off / page); /* "LD" */

		memset(mem + off, 0x5a, page);
		memcpy(mem + off, &tag, sizeof(tag));
	}
	seconds = now() - start;
	printf("LIVEDUMP-TOUCH mib=%lu seconds=%.3f mib_per_s=%.1f\n", mib,
	       seconds, seconds > 0 ? mib / seconds : 0.0);
	return 0;
}

/* Write `mib` MiB of files of 64 MiB each into /dev/shm, as page cache: each
 * page starts with its own index, then half a page of pseudo-random bytes,
 * then 0x5a, so that it compresses about as well as text does. */
static int cache(unsigned long mib)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t chunk = (size_t)1 << 20, per_file = (size_t)64 << 20;
	unsigned char *buf = malloc(chunk);
	uint64_t state = 0x9e3779b97f4a7c15ULL, index = 0;
	double start = now(), seconds;
	int fd = -1;

	if (!buf)
		fail("malloc");
	memset(buf, 0x5a, chunk);
	for (size_t done = 0; done < (size_t)mib << 20; done += chunk) {
		if (done % per_file == 0) {
			char name[64];

			if (fd >= 0 && close(fd) != 0)
				fail("close");
			snprintf(name, sizeof(name), "/dev/shm/livedump-cache-%zu",
				 done / per_file);
			fd = open(name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
			if (fd < 0)
				fail("creating %s", name);
		}
		for (size_t off = 0; off < chunk; off += page) {
			uint64_t tag = 0x4c43000000000000ULL | index++; /* "LC" */
			uint64_t *words = (uint64_t *)(buf + off);

			words[0] = tag;
			for (size_t w = 1; w < page / 16; w++) {
				state ^= state << 13;
				state ^= state >> 7;
				state ^= state << 17;
				words[w] = state;
			}
		}
		if (write(fd, buf, chunk) != (ssize_t)chunk)
			fail("writing the cache files");
	}
	if (fd >= 0 && close(fd) != 0)
		fail("close");
	free(buf);
	seconds = now() - start;
	printf("LIVEDUMP-CACHE mib=%lu seconds=%.3f mib_per_s=%.1f\n", mib,
	       seconds, seconds > 0 ? mib / seconds : 0.0);
	return 0;
}

/* Guest-physical address of the page holding `addr` in this process. */
static uint64_t physical(int pagemap, const void *addr, size_t page)
{
	uint64_t entry;
	off_t where = (off_t)((uintptr_t)addr / page * sizeof(entry));

	if (pread(pagemap, &entry, sizeof(entry), where) != sizeof(entry))
		fail("reading /proc/self/pagemap");
	if (!(entry & PAGEMAP_PRESENT))
		fail("marker page %p is not present", addr);
	if (!(entry & PAGEMAP_PFN_MASK))
		fail("pagemap hides page frame numbers (not root?)");
	return (entry & PAGEMAP_PFN_MASK) * page;
}

static int marker(unsigned long count)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	unsigned char *mem = anonymous(count * page, 0);
	uint64_t nonce;
	int pagemap;

	/* A fresh nonce per boot, so a stale dump can never match.  Early in
	 * a TCG boot the RNG may not be initialised yet (GRND_NONBLOCK fails);
	 * GRND_INSECURE (Linux >= 5.6) never blocks and is good enough here. */
	if (getrandom(&nonce, sizeof(nonce), GRND_INSECURE) != sizeof(nonce))
		nonce = (uint64_t)(now() * 1e9) ^ ((uint64_t)getpid() << 32);

	/* Page i holds its text repeated over the whole page, from offset 0. */
	for (unsigned long i = 0; i < count; i++) {
		char text[64];
		size_t len = (size_t)snprintf(text, sizeof(text),
					      "LIVEDUMP-MARKER-%016llx-%lu",
					      (unsigned long long)nonce, i);

		for (size_t off = 0; off < page; off += len)
			memcpy(mem + i * page + off, text,
			       page - off < len ? page - off : len);
	}
	if (mlock(mem, count * page) != 0)
		fail("mlock");

	pagemap = open("/proc/self/pagemap", O_RDONLY);
	if (pagemap < 0)
		fail("opening /proc/self/pagemap");
	for (unsigned long i = 0; i < count; i++) {
		const unsigned char *p = mem + i * page;

		printf("LIVEDUMP-MARKER gpa=%#llx text=LIVEDUMP-MARKER-%016llx-%lu\n",
		       (unsigned long long)physical(pagemap, p, page),
		       (unsigned long long)nonce, i);
	}
	close(pagemap);
	return 0;
}

int main(int argc, char **argv)
{
	int ready[2];
	unsigned char status = 1;
	unsigned long n;
	char *end;
	pid_t child;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 3 || (strcmp(argv[1], "touch") && strcmp(argv[1], "marker")
			  && strcmp(argv[1], "cache"))) {
		fprintf(stderr, "usage: %s touch MIB | marker COUNT | cache MIB\n", argv[0]);
		return 2;
	}
	errno = 0;
	n = strtoul(argv[2], &end, 0);
	if (errno || *end || !*argv[2] || n == 0)
		fail("bad count '%s'", argv[2]);

	if (pipe(ready) != 0)
		fail("pipe");
	child = fork();
	if (child < 0)
		fail("fork");
	if (child > 0) {
		/* Parent: wait for the child's status byte (EOF means it died). */
		close(ready[1]);
		while (read(ready[0], &status, 1) < 0 && errno == EINTR)
			;
		return status;
	}

	/* Child: do the work, report, then keep the memory forever. */
	close(ready[0]);
	setsid();
	status = strcmp(argv[1], "touch") == 0 ? touch(n)
		 : strcmp(argv[1], "cache") == 0 ? cache(n) : marker(n);
	fflush(stdout);
	if (write(ready[1], &status, 1) != 1)
		return 1;
	close(ready[1]);
	for (;;)
		pause();
}
