/*
 * metaops: metadata micro-benchmark used by bench/mount.sh.
 *
 *   metaops DIR N
 *
 * Creates a fresh subdirectory DIR/metaops.<pid>, then in three timed phases:
 *   create: for each of N files: open(O_CREAT|O_WRONLY|O_TRUNC, 0644),
 *           write 100 bytes, close
 *   stat:   stat() each file (and check its size is 100)
 *   unlink: unlink() each file
 * and finally removes the subdirectory (untimed).
 *
 * Prints one machine-readable line on stdout:
 *   n=N create_ops=X stat_ops=Y unlink_ops=Z total_ops=T create_s=... ...
 * where *_ops are operations per second of that phase (one file = one op)
 * and total_ops = 3*N / (time of all three phases).
 * Any failing syscall aborts with a message on stderr and exit status 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *phase, const char *path)
{
	fprintf(stderr, "metaops: %s %s: %s\n", phase, path, strerror(errno));
	exit(1);
}

static void file_path(char *out, size_t len, const char *dir, long i)
{
	int r = snprintf(out, len, "%s/f%07ld", dir, i);
	if (r < 0 || (size_t)r >= len) {
		fprintf(stderr, "metaops: path too long\n");
		exit(2);
	}
}

int main(int argc, char **argv)
{
	char sub[PATH_MAX], path[PATH_MAX], buf[100];
	char *end;
	long n, i;
	double t0, t1, t2, t3;
	int r;

	if (argc != 3) {
		fprintf(stderr, "usage: %s DIR N\n", argv[0]);
		return 2;
	}
	errno = 0;
	n = strtol(argv[2], &end, 10);
	if (errno || *end || n <= 0 || n > 9999999) {
		fprintf(stderr, "metaops: bad N: %s\n", argv[2]);
		return 2;
	}
	r = snprintf(sub, sizeof(sub), "%s/metaops.%ld", argv[1], (long)getpid());
	if (r < 0 || (size_t)r >= sizeof(sub) - 16) {
		fprintf(stderr, "metaops: path too long\n");
		return 2;
	}
	if (mkdir(sub, 0755) != 0)
		die("mkdir", sub);
	memset(buf, 'x', sizeof(buf));

	t0 = now();
	for (i = 0; i < n; i++) {
		int fd;
		ssize_t w;

		file_path(path, sizeof(path), sub, i);
		fd = open(path, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0644);
		if (fd < 0)
			die("create", path);
		w = write(fd, buf, sizeof(buf));
		if (w != (ssize_t)sizeof(buf)) {
			if (w >= 0)
				errno = EIO;
			die("write", path);
		}
		if (close(fd) != 0)
			die("close", path);
	}
	t1 = now();
	for (i = 0; i < n; i++) {
		struct stat st;

		file_path(path, sizeof(path), sub, i);
		if (stat(path, &st) != 0)
			die("stat", path);
		if (st.st_size != (off_t)sizeof(buf)) {
			fprintf(stderr, "metaops: stat %s: size %lld, expected %zu\n",
				path, (long long)st.st_size, sizeof(buf));
			return 1;
		}
	}
	t2 = now();
	for (i = 0; i < n; i++) {
		file_path(path, sizeof(path), sub, i);
		if (unlink(path) != 0)
			die("unlink", path);
	}
	t3 = now();
	if (rmdir(sub) != 0)
		die("rmdir", sub);

	printf("n=%ld create_ops=%.1f stat_ops=%.1f unlink_ops=%.1f total_ops=%.1f "
	       "create_s=%.6f stat_s=%.6f unlink_s=%.6f total_s=%.6f\n",
	       n, n / (t1 - t0), n / (t2 - t1), n / (t3 - t2), 3.0 * n / (t3 - t0),
	       t1 - t0, t2 - t1, t3 - t2, t3 - t0);
	return 0;
}
