// SPDX-License-Identifier: MIT OR GPL-2.0
/*
 * filesync's eBPF watcher: reports every successful syscall that changes something
 * under the watched folder, with the byte range of writes and the writer's pid.
 *
 * Everything happens at sys_exit, where the return value says whether the call
 * succeeded, the argument registers still hold the arguments, and the objects the
 * call used (the written file, the new file of an open, the directory fds) can still
 * be reached. There is no sys_enter program: a second program on every syscall of
 * the machine costs more than all the filtering. So close(), whose fd is gone at
 * sys_exit, is recognised by the fd table and fd number that earlier calls wrote
 * through (written_fds); the implicit close of every fd when a process exits is
 * handled at sched_process_exit.
 *
 * Filtering happens here, not in userspace, so that the rest of the machine pays
 * only for a few map lookups: a file is watched when walking d_parent from its
 * dentry reaches the watched root's (dev, ino) in watched_dirs. A path-based
 * call (unlink, rename, mkdir, ...) cannot be resolved here (no path lookup from
 * a tracepoint), so its record carries the raw path and the d_name chain of the
 * directory it is relative to, and userspace joins them.
 *
 * Record layout (little endian), read by src/capture/ebpf.rs:
 *   struct record_header (64 bytes), then data_len bytes of items, each
 *   [u8 type][u8 0][u16 len][len bytes]. NAME items are d_name components from
 *   the leaf up to (not including) the watched root.
 */
#include "kernel.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl). */
#define NR_write 1
#define NR_open 2
#define NR_close 3
#define NR_pwrite64 18
#define NR_writev 20
#define NR_sendfile 40
#define NR_fsync 74
#define NR_fdatasync 75
#define NR_truncate 76
#define NR_ftruncate 77
#define NR_rename 82
#define NR_mkdir 83
#define NR_rmdir 84
#define NR_creat 85
#define NR_link 86
#define NR_unlink 87
#define NR_symlink 88
#define NR_chmod 90
#define NR_fchmod 91
#define NR_chown 92
#define NR_fchown 93
#define NR_lchown 94
#define NR_utime 132
#define NR_mknod 133
#define NR_setxattr 188
#define NR_lsetxattr 189
#define NR_fsetxattr 190
#define NR_removexattr 197
#define NR_lremovexattr 198
#define NR_fremovexattr 199
#define NR_utimes 235
#define NR_openat 257
#define NR_mkdirat 258
#define NR_mknodat 259
#define NR_fchownat 260
#define NR_futimesat 261
#define NR_unlinkat 263
#define NR_renameat 264
#define NR_linkat 265
#define NR_symlinkat 266
#define NR_fchmodat 268
#define NR_splice 275
#define NR_utimensat 280
#define NR_fallocate 285
#define NR_pwritev 296
#define NR_renameat2 316
#define NR_copy_file_range 326
#define NR_pwritev2 328
#define NR_openat2 437
#define NR_fchmodat2 452
#define NR_setxattrat 463
#define NR_removexattrat 466

/* Every number decode() knows, as X(w, nr) items: tracked() tests them first. */
#define TRACKED_SYSCALLS(X, w) \
	X(w, NR_write) X(w, NR_open) X(w, NR_close) X(w, NR_pwrite64) X(w, NR_writev) \
	X(w, NR_sendfile) X(w, NR_fsync) X(w, NR_fdatasync) X(w, NR_truncate) \
	X(w, NR_ftruncate) X(w, NR_rename) X(w, NR_mkdir) X(w, NR_rmdir) X(w, NR_creat) \
	X(w, NR_link) X(w, NR_unlink) X(w, NR_symlink) X(w, NR_chmod) X(w, NR_fchmod) \
	X(w, NR_chown) X(w, NR_fchown) X(w, NR_lchown) X(w, NR_utime) X(w, NR_mknod) \
	X(w, NR_setxattr) X(w, NR_lsetxattr) X(w, NR_fsetxattr) X(w, NR_removexattr) \
	X(w, NR_lremovexattr) X(w, NR_fremovexattr) X(w, NR_utimes) X(w, NR_openat) \
	X(w, NR_mkdirat) X(w, NR_mknodat) X(w, NR_fchownat) X(w, NR_futimesat) \
	X(w, NR_unlinkat) X(w, NR_renameat) X(w, NR_linkat) X(w, NR_symlinkat) \
	X(w, NR_fchmodat) X(w, NR_splice) X(w, NR_utimensat) X(w, NR_fallocate) \
	X(w, NR_pwritev) X(w, NR_renameat2) X(w, NR_copy_file_range) X(w, NR_pwritev2) \
	X(w, NR_openat2) X(w, NR_fchmodat2) X(w, NR_setxattrat) X(w, NR_removexattrat)

/* uapi and kernel constants; all are ABI or have been stable for a decade. */
#define AT_FDCWD -100
#define AT_REMOVEDIR 0x200
#define O_WRONLY 01
#define O_RDWR 02
#define O_CREAT 0100
#define O_TRUNC 01000
#define O_APPEND 02000
#define RWF_APPEND 0x10
#define S_IFMT 0170000
#define S_IFREG 0100000
#define FMODE_WRITE 0x2
#define FMODE_CREATED (1 << 20)
#define TS_COMPAT 0x0002
#define UTIME_NOW ((1L << 30) - 1)

/* Record operations; mirrored in src/capture/ebpf.rs. */
enum op_code {
	OP_WRITE = 1,      /* a = offset, b = length */
	OP_TRUNCATE_OPEN,  /* opened with O_TRUNC */
	OP_CREATE,         /* a = mode for mknod of a regular file */
	OP_SET_SIZE,       /* a = size */
	OP_FALLOCATE,      /* a = offset, b = length, c = mode */
	OP_CLOSED,
	OP_UNLINK,
	OP_RMDIR,
	OP_RENAME,         /* c = renameat2 flags */
	OP_MKDIR,
	OP_MKNOD,          /* a = mode, b = rdev */
	OP_SYMLINK,        /* STR item = target */
	OP_LINK,           /* side 0 = existing name, side 1 = new name */
	OP_CHMOD,          /* a = mode */
	OP_CHOWN,          /* a = uid, b = gid; (u32)-1 = unchanged */
	OP_SET_XATTR,      /* STR item = name */
	OP_REMOVE_XATTR,   /* STR item = name */
	OP_UTIMES,         /* a, b = atime sec, nsec; c, d = mtime sec, nsec */
	OP_FSYNC,          /* a = 1 for fdatasync */
	OP_OPEN_WRITE = 100, /* an open for writing: remembered for its close, not reported */
};

/* How a write's offset is found at sys_exit. */
enum write_at {
	AT_POS = 1,    /* write, writev, sendfile: f_pos has moved past the data */
	AT_ARG,        /* pwrite64, pwritev: the offset argument */
	AT_ARG_OR_POS, /* pwritev2: the offset argument, -1 meaning f_pos */
	AT_USER_OFF,   /* copy_file_range, splice: *off_out if given, else f_pos */
};

/* Record flags; mirrored in src/capture/ebpf.rs. */
#define F_SIDE0 0x1      /* side 0 (the file, or the source name) is watched */
#define F_SIDE1 0x2      /* side 1 (the destination name) is watched */
#define F_TRUNCATED 0x4  /* a name or path did not fit: the path is unknown */
#define F_UNLINKED 0x8   /* the file has no name any more */
#define F_FILE 0x10      /* dev and ino identify the file */

/* Item types; mirrored in src/capture/ebpf.rs. */
#define ITEM_NAME0 1
#define ITEM_NAME1 2
#define ITEM_PATH0 3
#define ITEM_PATH1 4
#define ITEM_STR 5
#define ITEM_HDR 4

/* anchor values: how userspace roots a side's path. */
#define ANCHOR_CHAIN 0xffff /* the side's NAME items lead up to the watched root */

/* Files more than MAX_DEPTH - 1 levels below the root are not seen (the reconcile scan
 * finds them): the walk is a bounded loop. */
#define MAX_DEPTH 32
/* Longer paths are cut and flagged F_TRUNCATED; userspace then asks for a rescan. */
#define PATH_READ 512
#define NAME_READ 255
/* Bytes of items per record; records stay small so that bursts fit the ring. */
#define DATA_LIMIT 4096
#define DATA_MASK (DATA_LIMIT - 1)
#define PREFIX_MAX 512
/* More fds are not looked at when a process exits: fds above are rare for writers. */
#define REAP_MAX_FDS 1024

#define DIR_ROOT 1     /* the watched folder */
#define DIR_ANCESTOR 2 /* a directory above it; prefix_off says where its name ends */

struct record_header {
	__u16 op;
	__u16 flags;
	__u32 tgid;
	__u32 dev; /* kernel encoding: major << 20 | minor */
	__u16 anchor[2];
	__u64 ino;
	__u64 a, b, c, d;
	__u32 data_len;
	__u32 reserved;
};
_Static_assert(sizeof(struct record_header) == 64, "the record header is 64 bytes");

struct record {
	struct record_header hdr;
	/* Room past DATA_LIMIT lets the verifier see masked offsets plus a bounded copy stay inside. */
	__u8 data[DATA_LIMIT + PATH_READ + ITEM_HDR];
};

struct dir_key {
	__u32 dev;
	__u32 pad;
	__u64 ino;
};

struct dir_val {
	__u32 kind;
	__u32 prefix_off;
};

struct prefix {
	__u32 len;
	char s[PREFIX_MAX];
};

/* What a syscall means, decoded from its number and registers. */
struct op {
	__u32 code;
	__u32 write_at;
	__s32 fd;       /* fd-based: the file; -1 for path-based calls */
	bool fd_is_ret; /* an open: the file is the fd it returned */
	__s32 dirfd[2];
	__u64 path[2];  /* user pointers; 0 when the call has no such side */
	__u64 str;      /* user pointer: xattr name or symlink target */
	__u64 a, b, c;
};

/* Set by the loader (override_global) to the watched folder's sb->s_dev, a cheap first filter. */
const volatile __u32 root_dev = 0;

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);
} events SEC(".maps");

/* The watched root and its ancestors (the latter for paths relative to a directory above it). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct dir_key);
	__type(value, struct dir_val);
} watched_dirs SEC(".maps");

/* Absolute path of the watched root, without a trailing slash. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct prefix);
} root_prefix SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u8);
} ignored_tgids SEC(".maps");

/*
 * Files written recently that are not under the root, so that the next write to one
 * costs an array slot instead of a d_parent walk (the walk is most of what the program
 * costs the rest of the machine). A direct-mapped cache per CPU, indexed by a hash of
 * (tgid, fd), which known_outside() can compute without reading the file: per CPU, so
 * that no other CPU can tear an entry; an array, because its lookup is inlined, where a
 * hash lookup cost as much as a probe read. An entry holds while the slot names the
 * same struct file, the file still has the same dentry and inode number, and no rename,
 * unlink or rmdir happened anywhere since (name_changes): each can move a file in or
 * out. The inode number matters because a dentry can be evicted without any unlink and
 * its memory reused for a new file (with a struct file at a reused address too): the
 * new file cannot have the number of a file still linked. Only "outside" is cached; a
 * watched file is walked on every write, to name it exactly.
 */
#define OUTSIDE_SLOTS 1024 /* the hash below keeps 10 bits */

struct outside_slot {
	__u64 file;
	__u64 dentry;
	__u64 ino;
	__u64 name_changes;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, OUTSIDE_SLOTS);
	__type(key, __u32);
	__type(value, struct outside_slot);
} outside_files SEC(".maps");

/*
 * The fds through which a process changed a watched file, so that their close can be
 * reported from sys_exit: by then the fd is gone, and the struct file may be freed (on
 * 6.15+ close() releases it synchronously), so what the record needs is kept here.
 * Reading it at sys_enter instead would cost a second program on every syscall of the
 * machine. An LRU: fds closed unseen (dup2 over them, close_range, exec) age out.
 */
struct fd_key {
	__u64 files; /* struct files_struct *: the fd table */
	__s32 fd;
	__u32 pad;
};

struct written_fd {
	__u64 file;
	__u64 dentry;
	__u64 ino;
	__u32 dev;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct fd_key);
	__type(value, struct written_fd);
} written_fds SEC(".maps");

/* Renames, unlinks and rmdirs seen system-wide. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} name_changes SEC(".maps");

/* Records the ring had no room for; userspace turns an increase into one rescan. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

/* A record is built here: it is far larger than the 512-byte stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct record);
} scratch SEC(".maps");

static __always_inline struct record *new_record(__u32 op, __u32 tgid)
{
	__u32 zero = 0;
	struct record *r = bpf_map_lookup_elem(&scratch, &zero);

	if (!r)
		return NULL;
	__builtin_memset(&r->hdr, 0, sizeof(r->hdr));
	r->hdr.op = op;
	r->hdr.tgid = tgid;
	r->hdr.anchor[0] = ANCHOR_CHAIN;
	r->hdr.anchor[1] = ANCHOR_CHAIN;
	return r;
}

static __always_inline void emit(struct record *r, __u32 off)
{
	__u32 zero = 0;
	__u64 *dropped;

	if (off > DATA_LIMIT)
		off = DATA_LIMIT;
	r->hdr.data_len = off;
	if (bpf_ringbuf_output(&events, r, sizeof(r->hdr) + off, 0) == 0)
		return;
	dropped = bpf_map_lookup_elem(&drops, &zero);
	if (dropped)
		*dropped += 1;
}

static __always_inline bool ignored(__u32 tgid)
{
	return bpf_map_lookup_elem(&ignored_tgids, &tgid) != NULL;
}

static __always_inline bool has_room(struct record *r, __u32 off, __u32 len)
{
	if (off + ITEM_HDR + len <= DATA_LIMIT)
		return true;
	r->hdr.flags |= F_TRUNCATED;
	return false;
}

static __always_inline void item_header(struct record *r, __u32 off, __u8 type, __u32 len)
{
	__u32 o = off & DATA_MASK;

	r->data[o] = type;
	r->data[o + 1] = 0;
	r->data[o + 2] = len & 0xff;
	r->data[o + 3] = (len >> 8) & 0xff;
}

/* Appends a user string (path, xattr name, symlink target); returns its length or -1. */
static __always_inline long put_user_str(struct record *r, __u32 *off, __u8 type, const void *ustr)
{
	__u32 o = *off & DATA_MASK;
	__u32 room = o + ITEM_HDR < DATA_LIMIT ? DATA_LIMIT - o - ITEM_HDR : 0;
	long n;

	if (room > PATH_READ)
		room = PATH_READ;
	if (room == 0) {
		r->hdr.flags |= F_TRUNCATED;
		return -1;
	}
	n = bpf_probe_read_user_str(&r->data[o + ITEM_HDR], room, ustr);
	if (n <= 0)
		return -1;
	/* A string that filled the room may have been cut. */
	if (n == room)
		r->hdr.flags |= F_TRUNCATED;
	n -= 1; /* the NUL */
	item_header(r, o, type, n);
	*off = o + ITEM_HDR + n;
	return n;
}

/*
 * The functions marked __noinline are global BPF functions: the verifier checks each
 * once with unknown arguments instead of once per call site and per syscall case,
 * which keeps the programs far below its 1M-instruction budget. Kernel pointers
 * cross them as __u64 (a pointer argument would have to point at BPF memory).
 */

/* Appends the d_name components from d up to, not including, depth levels above it. */
__noinline int put_chain(struct record *r, __u32 *off, __u8 type, __u64 dentry, int depth)
{
	struct dentry *d = (struct dentry *)dentry;

	if (!r || !off)
		return 0;
	for (int i = 0; i < MAX_DEPTH; i++) {
		__u32 o = *off & DATA_MASK;
		__u32 len;

		if (i >= depth)
			break;
		len = BPF_CORE_READ(d, d_name.len);
		if (len > NAME_READ)
			len = NAME_READ;
		if (!has_room(r, o, len))
			break;
		bpf_probe_read_kernel(&r->data[o + ITEM_HDR], len & NAME_READ, BPF_CORE_READ(d, d_name.name));
		item_header(r, o, type, len);
		*off = o + ITEM_HDR + (len & NAME_READ);
		d = BPF_CORE_READ(d, d_parent);
	}
	return 0;
}

/* How many levels above the dentry the watched root is (0: it is the root), or -1. */
__noinline int root_depth(__u64 dentry, __u32 dev)
{
	struct dentry *d = (struct dentry *)dentry;
	struct dir_key key = { .dev = dev };

	for (int i = 0; i < MAX_DEPTH; i++) {
		struct dir_val *v;
		struct dentry *parent;

		key.ino = BPF_CORE_READ(d, d_inode, i_ino);
		v = bpf_map_lookup_elem(&watched_dirs, &key);
		if (v && v->kind == DIR_ROOT)
			return i;
		parent = BPF_CORE_READ(d, d_parent);
		if (!parent || parent == d)
			return -1;
		d = parent;
	}
	return -1;
}

/*
 * task must be a BTF pointer (bpf_get_current_task_btf, a tracepoint argument): then
 * the loads up to the fd array are plain loads, far cheaper than probe reads. The
 * array holds struct file pointers, which the verifier cannot type, so that one load
 * and everything after it are probe reads.
 */
static __always_inline struct file *fd_file(struct task_struct *task, int fd)
{
	struct fdtable *fdt = task->files->fdt;
	struct file **fds;
	struct file *f = NULL;

	if (fd < 0 || (__u32)fd >= fdt->max_fds)
		return NULL;
	fds = fdt->fd;
	bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]);
	return f;
}

static __always_inline __u64 *name_change_counter(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&name_changes, &zero);
}

/*
 * Called at the exit of every rename, unlink and rmdir, whether it succeeded or not. A
 * write between the name moving and this count still sees the old "outside"; that write
 * belongs to a file that has just moved in, which is reported as new as a whole.
 */
static __always_inline void count_name_change(void)
{
	__u64 *n = name_change_counter();

	if (n)
		__sync_fetch_and_add(n, 1);
}

/* Calls after which closing the fd is reported: they show the fd can write. */
static __always_inline bool writes_through_fd(__u32 code)
{
	return code == OP_WRITE || code == OP_CREATE || code == OP_TRUNCATE_OPEN || code == OP_OPEN_WRITE ||
	       code == OP_FALLOCATE || code == OP_SET_SIZE;
}

static __always_inline bool changes_names(long nr)
{
	return nr == NR_rename || nr == NR_renameat || nr == NR_renameat2 || nr == NR_unlink ||
	       nr == NR_unlinkat || nr == NR_rmdir;
}

static __always_inline bool is_regular(struct file *f)
{
	return (BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) == S_IFREG;
}

static __always_inline struct outside_slot *outside_slot(__u32 tgid, int fd)
{
	/* Fibonacci hashing: the top bits of the product mix all bits of the key. */
	__u32 index = ((((__u64)tgid << 32) | (__u32)fd) * 0x9e3779b97f4a7c15ULL) >> 54;

	return bpf_map_lookup_elem(&outside_files, &index);
}

/*
 * How many levels below the watched root an open file is, or -1; cache: use and fill
 * the outside_files slot of (tgid, fd), the fd f was reached through.
 */
static __always_inline int file_depth(struct file *f, bool cache, __u32 tgid, int fd)
{
	struct dentry *d = BPF_CORE_READ(f, f_path.dentry);
	__u64 ino = BPF_CORE_READ(f, f_inode, i_ino);
	struct outside_slot *slot = outside_slot(tgid, fd);
	__u64 *counter = name_change_counter();
	__u64 name_changes;
	__u32 dev;
	int depth;

	if (!counter || !slot)
		return -1;
	/* Read before the walk: a rename during it makes the new entry stale at once. */
	name_changes = *counter;
	if (cache && slot->file == (__u64)f && slot->dentry == (__u64)d && slot->ino == ino &&
	    slot->name_changes == name_changes)
		return -1;
	dev = BPF_CORE_READ(d, d_sb, s_dev);
	depth = dev == root_dev ? root_depth((__u64)d, dev) : -1;
	if (depth < 0 && cache) {
		slot->file = (__u64)f;
		slot->dentry = (__u64)d;
		slot->ino = ino;
		slot->name_changes = name_changes;
	}
	return depth;
}

/* Fills side 0 from an open file depth levels below the watched root. */
static __always_inline void put_file(struct record *r, __u32 *off, struct file *f, int depth)
{
	struct inode *inode = BPF_CORE_READ(f, f_inode);

	r->hdr.flags |= F_SIDE0 | F_FILE;
	r->hdr.dev = BPF_CORE_READ(inode, i_sb, s_dev);
	r->hdr.ino = BPF_CORE_READ(inode, i_ino);
	if (BPF_CORE_READ(inode, i_nlink) == 0)
		r->hdr.flags |= F_UNLINKED;
	put_chain(r, off, ITEM_NAME0, (__u64)BPF_CORE_READ(f, f_path.dentry), depth);
}

/* Does the path at data[pos..pos+n) name the root or something under it, read from prefix[from..]? */
__noinline int prefix_match(struct record *r, __u32 pos, __u32 n, __u32 from)
{
	__u32 zero = 0;
	struct prefix *p = bpf_map_lookup_elem(&root_prefix, &zero);
	__u32 want;

	if (!r || !p || p->len > PREFIX_MAX || from > p->len)
		return false;
	want = p->len - from;
	if (n < want)
		return false;
	for (__u32 i = 0; i < PREFIX_MAX; i++) {
		if (i >= want)
			break;
		if (r->data[(pos + i) & DATA_MASK] != p->s[(from + i) & (PREFIX_MAX - 1)])
			return false;
	}
	return n == want || r->data[(pos + want) & DATA_MASK] == '/';
}

/*
 * Fills one side of a path-based call when the path is under the watched root:
 * absolute paths by prefix, relative ones by the directory they start from (under
 * the root, or an ancestor of it followed by the rest of the root's path).
 */
__noinline int path_side(struct record *r, __u32 *off, int side, int dirfd, __u64 upath)
{
	struct task_struct *task = bpf_get_current_task_btf();
	__u32 start, from = 0;
	struct dentry *d;
	struct dir_key key = {};
	struct dir_val *v;
	long n;
	int depth;

	if (!r || !off)
		return false;
	start = *off & DATA_MASK;
	n = put_user_str(r, off, ITEM_PATH0 + side, (void *)upath);
	if (n < 0)
		return false;
	if (r->data[(start + ITEM_HDR) & DATA_MASK] == '/')
		goto by_prefix;
	if (dirfd == AT_FDCWD) {
		d = BPF_CORE_READ(task, fs, pwd.dentry);
	} else {
		struct file *f = fd_file(task, dirfd);

		if (!f)
			goto outside;
		d = BPF_CORE_READ(f, f_path.dentry);
	}
	key.dev = BPF_CORE_READ(d, d_inode, i_sb, s_dev);
	if (key.dev == root_dev) {
		depth = root_depth((__u64)d, key.dev);
		if (depth >= 0) {
			put_chain(r, off, ITEM_NAME0 + side, (__u64)d, depth);
			return true;
		}
	}
	key.ino = BPF_CORE_READ(d, d_inode, i_ino);
	v = bpf_map_lookup_elem(&watched_dirs, &key);
	if (!v || v->kind != DIR_ANCESTOR)
		goto outside;
	from = v->prefix_off;
by_prefix:
	if (!prefix_match(r, start + ITEM_HDR, n, from))
		goto outside;
	r->hdr.anchor[side & 1] = from;
	return true;
outside:
	*off = start;
	return false;
}

/* Word w of the bitmap of TRACKED_SYSCALLS, a constant. */
#define TRACKED_BIT(w, nr) | ((nr) >> 6 == (w) ? 1ULL << ((nr) & 63) : 0)
#define TRACKED_WORD(w) (0 TRACKED_SYSCALLS(TRACKED_BIT, w))

/*
 * Whether decode() knows nr, in a few instructions: most syscalls of the machine are
 * none of these, and leave here before anything is read or zeroed.
 */
static __always_inline bool tracked(long nr)
{
	__u64 word;

	switch (nr >> 6) {
	case 0: word = TRACKED_WORD(0); break;
	case 1: word = TRACKED_WORD(1); break;
	case 2: word = TRACKED_WORD(2); break;
	case 3: word = TRACKED_WORD(3); break;
	case 4: word = TRACKED_WORD(4); break;
	case 5: word = TRACKED_WORD(5); break;
	case 6: word = TRACKED_WORD(6); break;
	case 7: word = TRACKED_WORD(7); break;
	default: return false;
	}
	return (word >> (nr & 63)) & 1;
}

/* Fills op from the syscall number and its (unchanged) argument registers. */
static __always_inline bool decode(long nr, struct pt_regs *regs, struct op *op)
{
	__u64 di = regs->di, si = regs->si, dx = regs->dx, r10 = regs->r10, r8 = regs->r8;

	op->fd = -1;
	op->dirfd[0] = AT_FDCWD;
	op->dirfd[1] = AT_FDCWD;
	switch (nr) {
	case NR_close:
		op->code = OP_CLOSED;
		op->a = di;
		return true;
	case NR_write:
	case NR_writev:
		op->code = OP_WRITE;
		op->write_at = AT_POS;
		op->fd = di;
		return true;
	case NR_pwrite64:
	case NR_pwritev:
		op->code = OP_WRITE;
		op->write_at = AT_ARG;
		op->fd = di;
		op->a = r10;
		return true;
	case NR_pwritev2:
		op->code = OP_WRITE;
		op->write_at = AT_ARG_OR_POS;
		op->fd = di;
		op->a = r10;
		op->c = regs->r9;
		return true;
	case NR_sendfile:
		op->code = OP_WRITE;
		op->write_at = AT_POS;
		op->fd = di;
		return true;
	case NR_copy_file_range:
	case NR_splice:
		op->code = OP_WRITE;
		op->write_at = AT_USER_OFF;
		op->fd = dx;
		op->a = r10;
		return true;
	case NR_open:
	case NR_creat:
	case NR_openat:
	case NR_openat2:
		op->code = OP_CREATE; /* or OP_TRUNCATE_OPEN: decided from the new file */
		op->fd_is_ret = true;
		op->a = nr == NR_open ? si : nr == NR_openat ? dx : nr == NR_creat ? O_CREAT | O_TRUNC : 0;
		if (nr == NR_openat2 && bpf_probe_read_user(&op->a, sizeof(op->a), (void *)dx))
			return false;
		return op->a & (O_CREAT | O_TRUNC | O_WRONLY | O_RDWR);
	case NR_fsync:
	case NR_fdatasync:
		op->code = OP_FSYNC;
		op->fd = di;
		op->a = nr == NR_fdatasync;
		return true;
	case NR_ftruncate:
		op->code = OP_SET_SIZE;
		op->fd = di;
		op->a = si;
		return true;
	case NR_truncate:
		op->code = OP_SET_SIZE;
		op->path[0] = di;
		op->a = si;
		return true;
	case NR_fallocate:
		op->code = OP_FALLOCATE;
		op->fd = di;
		op->a = dx;
		op->b = r10;
		op->c = si;
		return true;
	case NR_unlink:
		op->code = OP_UNLINK;
		op->path[0] = di;
		return true;
	case NR_rmdir:
		op->code = OP_RMDIR;
		op->path[0] = di;
		return true;
	case NR_unlinkat:
		op->code = dx & AT_REMOVEDIR ? OP_RMDIR : OP_UNLINK;
		op->dirfd[0] = di;
		op->path[0] = si;
		return true;
	case NR_rename:
	case NR_link:
		op->code = nr == NR_rename ? OP_RENAME : OP_LINK;
		op->path[0] = di;
		op->path[1] = si;
		return true;
	case NR_renameat:
	case NR_renameat2:
	case NR_linkat:
		op->code = nr == NR_linkat ? OP_LINK : OP_RENAME;
		op->dirfd[0] = di;
		op->path[0] = si;
		op->dirfd[1] = dx;
		op->path[1] = r10;
		op->c = nr == NR_renameat2 ? r8 : 0;
		return true;
	case NR_mkdir:
		op->code = OP_MKDIR;
		op->path[0] = di;
		return true;
	case NR_mkdirat:
		op->code = OP_MKDIR;
		op->dirfd[0] = di;
		op->path[0] = si;
		return true;
	case NR_mknod:
	case NR_mknodat:
		op->dirfd[0] = nr == NR_mknod ? AT_FDCWD : di;
		op->path[0] = nr == NR_mknod ? di : si;
		op->a = nr == NR_mknod ? si : dx;
		op->b = nr == NR_mknod ? dx : r10;
		/* mknod with type 0 makes a regular file, like S_IFREG */
		op->code = (op->a & S_IFMT) == S_IFREG || (op->a & S_IFMT) == 0 ? OP_CREATE : OP_MKNOD;
		return true;
	case NR_symlink:
		op->code = OP_SYMLINK;
		op->str = di;
		op->path[0] = si;
		return true;
	case NR_symlinkat:
		op->code = OP_SYMLINK;
		op->str = di;
		op->dirfd[0] = si;
		op->path[0] = dx;
		return true;
	case NR_chmod:
		op->code = OP_CHMOD;
		op->path[0] = di;
		op->a = si;
		return true;
	case NR_fchmod:
		op->code = OP_CHMOD;
		op->fd = di;
		op->a = si;
		return true;
	case NR_fchmodat:
	case NR_fchmodat2:
		op->code = OP_CHMOD;
		op->dirfd[0] = di;
		op->path[0] = si;
		op->a = dx;
		return true;
	case NR_chown:
	case NR_lchown:
		op->code = OP_CHOWN;
		op->path[0] = di;
		op->a = (__u32)si;
		op->b = (__u32)dx;
		return true;
	case NR_fchown:
		op->code = OP_CHOWN;
		op->fd = di;
		op->a = (__u32)si;
		op->b = (__u32)dx;
		return true;
	case NR_fchownat:
		op->code = OP_CHOWN;
		op->dirfd[0] = di;
		op->path[0] = si;
		op->a = (__u32)dx;
		op->b = (__u32)r10;
		return true;
	case NR_setxattr:
	case NR_lsetxattr:
	case NR_removexattr:
	case NR_lremovexattr:
		op->code = nr == NR_setxattr || nr == NR_lsetxattr ? OP_SET_XATTR : OP_REMOVE_XATTR;
		op->path[0] = di;
		op->str = si;
		return true;
	case NR_fsetxattr:
	case NR_fremovexattr:
		op->code = nr == NR_fsetxattr ? OP_SET_XATTR : OP_REMOVE_XATTR;
		op->fd = di;
		op->str = si;
		return true;
	case NR_setxattrat:
	case NR_removexattrat:
		op->code = nr == NR_setxattrat ? OP_SET_XATTR : OP_REMOVE_XATTR;
		op->dirfd[0] = di;
		op->path[0] = si;
		op->str = r10;
		return true;
	case NR_utime:
	case NR_utimes:
		op->code = OP_UTIMES;
		op->path[0] = di;
		op->str = si; /* the times, read in times() */
		op->c = nr;
		return true;
	case NR_futimesat:
	case NR_utimensat:
		op->code = OP_UTIMES;
		/* A NULL path means the fd itself. */
		if (si)
			op->dirfd[0] = di, op->path[0] = si;
		else
			op->fd = di;
		op->str = dx;
		op->c = nr;
		return true;
	}
	return false;
}

/* Reads the new times of utime/utimes/futimesat/utimensat into a..d (NULL = now). */
static __always_inline void times(struct record *r, const struct op *op)
{
	__s64 t[4] = {};

	r->hdr.a = 0;
	r->hdr.b = UTIME_NOW;
	r->hdr.c = 0;
	r->hdr.d = UTIME_NOW;
	if (!op->str)
		return;
	if (op->c == NR_utime) {
		if (bpf_probe_read_user(t, 2 * sizeof(t[0]), (void *)op->str))
			return;
		r->hdr.a = t[0];
		r->hdr.b = 0;
		r->hdr.c = t[1];
		r->hdr.d = 0;
		return;
	}
	if (bpf_probe_read_user(t, sizeof(t), (void *)op->str))
		return;
	r->hdr.a = t[0];
	r->hdr.c = t[2];
	/* utimes and futimesat give microseconds */
	r->hdr.b = op->c == NR_utimensat ? t[1] : t[1] * 1000;
	r->hdr.d = op->c == NR_utimensat ? t[3] : t[3] * 1000;
}

/* The byte range a successful write-like call of ret bytes covered. */
static __always_inline void write_range(struct record *r, const struct op *op, struct file *f, long ret)
{
	__s64 end = BPF_CORE_READ(f, f_pos);
	__u64 user_off;

	if (op->write_at == AT_ARG || (op->write_at == AT_ARG_OR_POS && (__s64)op->a != -1))
		end = op->a + ret;
	if (op->write_at == AT_USER_OFF && op->a && !bpf_probe_read_user(&user_off, sizeof(user_off), (void *)op->a))
		end = user_off; /* the kernel advanced *off_out past the data */
	/* Appending writes land at the end whatever the offset said. */
	if ((op->write_at == AT_ARG || op->write_at == AT_ARG_OR_POS) &&
	    ((BPF_CORE_READ(f, f_flags) & O_APPEND) || (op->c & RWF_APPEND)))
		end = BPF_CORE_READ(f, f_inode, i_size);
	r->hdr.a = end - ret;
	r->hdr.b = ret;
}

/* Cheap checks of an fd-based call's file before the walk; an open may become OP_TRUNCATE_OPEN. */
static __always_inline bool fd_wanted(struct op *op, struct file *f, long ret)
{
	switch (op->code) {
	case OP_WRITE:
		/* Whether it is a regular file is checked after the cached "outside" test. */
		return ret > 0;
	case OP_CREATE:
		if (BPF_CORE_READ(f, f_mode) & FMODE_CREATED)
			return true;
		if (!is_regular(f))
			return false;
		if (op->a & O_TRUNC)
			op->code = OP_TRUNCATE_OPEN;
		else if (BPF_CORE_READ(f, f_mode) & FMODE_WRITE)
			op->code = OP_OPEN_WRITE;
		else
			return false;
		return true;
	}
	return true;
}

/* How many references the file has; 0 once the last one was dropped. */
static __always_inline __s64 references(struct file *f)
{
	__s64 n;

	if (bpf_core_field_exists(f->f_ref)) {
		/* file_ref_t holds references - 1, and goes negative once released. */
		n = BPF_CORE_READ(f, f_ref.refcnt.counter);
		return n < 0 ? 0 : n + 1;
	}
	return BPF_CORE_READ((struct file___pre_6_13 *)f, f_count.counter);
}

/* Reports that a file changed through an fd was closed, named by the dentry it was written through. */
static __always_inline void report_closed(struct written_fd *seen, __u32 tgid)
{
	struct dentry *d = (struct dentry *)seen->dentry;
	struct record *r;
	__u32 off = 0;
	int depth;

	depth = root_depth(seen->dentry, seen->dev);
	if (depth < 0)
		return; /* moved out of the root since */
	r = new_record(OP_CLOSED, tgid);
	if (!r)
		return;
	r->hdr.flags |= F_SIDE0 | F_FILE;
	r->hdr.dev = seen->dev;
	r->hdr.ino = seen->ino;
	/* Once unlinked the dentry may have been freed and reused: trust it only while it holds the inode. */
	if (BPF_CORE_READ(d, d_inode, i_ino) != seen->ino || BPF_CORE_READ(d, d_inode, i_nlink) == 0)
		r->hdr.flags |= F_UNLINKED;
	else
		put_chain(r, &off, ITEM_NAME0, seen->dentry, depth);
	emit(r, off);
}

/* Notes that the process can write a watched file through fd, for the report of its close. */
static __always_inline void remember_fd(struct task_struct *task, int fd, struct file *f)
{
	struct fd_key key = { .files = (__u64)task->files, .fd = fd };
	struct written_fd *known = bpf_map_lookup_elem(&written_fds, &key);
	struct written_fd seen = {};

	if (known && known->file == (__u64)f)
		return;
	if (!(BPF_CORE_READ(f, f_mode) & FMODE_WRITE))
		return;
	seen.file = (__u64)f;
	seen.dentry = (__u64)BPF_CORE_READ(f, f_path.dentry);
	seen.ino = BPF_CORE_READ(f, f_inode, i_ino);
	seen.dev = BPF_CORE_READ(f, f_inode, i_sb, s_dev);
	bpf_map_update_elem(&written_fds, &key, &seen, BPF_ANY);
}

/* close(fd) succeeded: report it when the fd could write a watched file and this was the last reference. */
static __always_inline int closed_fd(struct task_struct *task, int fd)
{
	struct fd_key key = { .files = (__u64)task->files, .fd = fd };
	struct written_fd *w = bpf_map_lookup_elem(&written_fds, &key);
	struct written_fd seen;
	__u32 tgid;

	if (!w)
		return 0;
	seen = *w;
	bpf_map_delete_elem(&written_fds, &key);
	/*
	 * struct file is SLAB_TYPESAFE_BY_RCU: freed, it is still a struct file, with no
	 * references until it is reused; reused, it has references again and is skipped.
	 */
	if (references((struct file *)seen.file) != 0)
		return 0;
	tgid = bpf_get_current_pid_tgid() >> 32;
	if (!ignored(tgid))
		report_closed(&seen, tgid);
	return 0;
}

/* Everything after decoding, verified once for all syscalls (see put_chain). */
__noinline int handle_exit(struct op *op, long ret)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct file *f = NULL;
	struct record *r;
	__u32 tgid, off = 0;
	int depth = -1;
	bool in0, in1;

	if (!op)
		return 0;
	/* ia32 syscalls have other numbers; they are not tracked. */
	if (task->thread_info.status & TS_COMPAT)
		return 0;
	if (op->code == OP_CLOSED)
		return closed_fd(task, op->a);
	/* fd-based calls are filtered first: they are most of the calls, and most are outside. */
	if (op->fd_is_ret)
		op->fd = ret;
	if (op->fd >= 0) {
		f = fd_file(task, op->fd);
		if (!f || !fd_wanted(op, f, ret))
			return 0;
		depth = file_depth(f, op->code == OP_WRITE, task->tgid, op->fd);
		if (depth < 0 || (op->code == OP_WRITE && !is_regular(f)))
			return 0;
	}
	tgid = bpf_get_current_pid_tgid() >> 32;
	if (ignored(tgid))
		return 0;
	if (f && writes_through_fd(op->code))
		remember_fd(task, op->fd, f);
	if (op->code == OP_OPEN_WRITE)
		return 0;
	r = new_record(op->code, tgid);
	if (!r)
		return 0;
	if (f) {
		put_file(r, &off, f, depth);
		if (op->code == OP_WRITE)
			write_range(r, op, f, ret);
	} else {
		in0 = path_side(r, &off, 0, op->dirfd[0], op->path[0]);
		in1 = op->path[1] && path_side(r, &off, 1, op->dirfd[1], op->path[1]);
		if (!in0 && !in1)
			return 0;
		r->hdr.flags |= (in0 ? F_SIDE0 : 0) | (in1 ? F_SIDE1 : 0);
	}
	switch (op->code) {
	case OP_WRITE:
		break;
	case OP_UTIMES:
		times(r, op);
		break;
	case OP_SYMLINK:
	case OP_SET_XATTR:
	case OP_REMOVE_XATTR:
		if (put_user_str(r, &off, ITEM_STR, (void *)op->str) < 0)
			r->hdr.flags |= F_TRUNCATED;
		/* fall through */
	default:
		r->hdr.a = op->a;
		r->hdr.b = op->b;
		r->hdr.c = op->c;
	}
	emit(r, off);
	return 0;
}

/*
 * bpf_rdonly_cast(addr, btf_id) (a kfunc, 6.2+) turns a kernel address into a pointer
 * the program may load through directly: the JIT makes each such load fault-safe, where
 * bpf_probe_read_kernel costs a helper call (about 40 ns each on the development VM,
 * most of the price of a write to an unwatched file). Neither clang 14 nor aya 0.14
 * links kfuncs, so the call is written as raw bytes whose immediates the loader
 * (src/capture/ebpf.rs) replaces: CAST_CALL_MAGIC by the kernel's BTF id of
 * bpf_rdonly_cast, CAST_FILE_MAGIC by that of struct file; btf_id 0 casts to plain
 * memory (void). Where the kernel refuses the casts, the loader turns each call into
 * r0 = 0: the casts return NULL, and every write takes the probe-read path.
 */
#define CAST_VOID 0
#define CAST_FILE_MAGIC 0x5a5a0002
#define RDONLY_CAST(addr, btf_id, out)                                                  \
	asm volatile("r1 = %[a]\n"                                                     \
		     "r2 = %[id]\n"                                                    \
		     /* call CAST_CALL_MAGIC (0x5a5a0001) as a kfunc (src_reg 2) */     \
		     ".byte 0x85, 0x20, 0x00, 0x00, 0x01, 0x00, 0x5a, 0x5a\n"          \
		     "%[o] = r0\n"                                                     \
		     : [o] "=r"(out)                                                   \
		     : [a] "r"(addr), [id] "i"(btf_id)                                  \
		     : "r0", "r1", "r2", "r3", "r4", "r5")

/* Calls that change a file through an fd and fill outside_files (OP_WRITE in decode()). */
static __always_inline bool writes_data(long nr)
{
	return nr == NR_write || nr == NR_writev || nr == NR_pwrite64 || nr == NR_pwritev ||
	       nr == NR_pwritev2 || nr == NR_sendfile || nr == NR_copy_file_range || nr == NR_splice;
}

/*
 * The fast path of a write to an unwatched file, the commonest call the program sees:
 * whether outside_files already knows the file fd names, read through casts (plain
 * loads) instead of probe reads, before anything else is decoded. False sends the call
 * down the full path, which fills the cache.
 */
static __always_inline bool known_outside(int fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = task->files->fdt;
	__u64 *counter = name_change_counter();
	struct outside_slot *slot;
	__u64 *fds;
	struct file *f;

	if (!counter || fd < 0 || (__u32)fd >= fdt->max_fds)
		return false;
	slot = outside_slot(task->tgid, fd);
	if (!slot || slot->name_changes != *counter)
		return false;
	RDONLY_CAST((__u64)fdt->fd, CAST_VOID, fds);
	if (!fds)
		return false;
	RDONLY_CAST(fds[fd], CAST_FILE_MAGIC, f);
	return f && slot->file == (__u64)f && slot->dentry == (__u64)f->f_path.dentry &&
	       slot->ino == f->f_inode->i_ino;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(filesync_exit, struct pt_regs *regs, long ret)
{
	long nr = regs->orig_ax;
	struct op op = {};

	if (!tracked(nr))
		return 0;
	/* No name-changing call is among these, so name_changes still counts them all. */
	if (writes_data(nr) && ret > 0 &&
	    known_outside(nr == NR_copy_file_range || nr == NR_splice ? regs->dx : regs->di))
		return 0;
	if (changes_names(nr))
		count_name_change();
	if (ret < 0 || !decode(nr, regs, &op))
		return 0;
	return handle_exit(&op, ret);
}

struct reap_ctx {
	__u64 files;
	__u64 fds;      /* struct file ** */
	__u64 open_fds; /* unsigned long * */
	__u32 tgid;
	__u32 pad;
};

/* Reports fd when the exiting process held a watched file open for writing alone through it. */
__noinline int reap_fd(struct reap_ctx *c, __u32 fd)
{
	struct fd_key key = { .fd = fd };
	struct record *r;
	struct file *f = NULL;
	__u32 off = 0;
	int depth;

	if (!c)
		return 0;
	key.files = c->files;
	bpf_map_delete_elem(&written_fds, &key);
	bpf_probe_read_kernel(&f, sizeof(f), (struct file **)c->fds + fd);
	if (!f || !(BPF_CORE_READ(f, f_mode) & FMODE_WRITE) || !is_regular(f) || references(f) != 1)
		return 0;
	depth = file_depth(f, false, 0, 0);
	if (depth < 0)
		return 0;
	r = new_record(OP_CLOSED, c->tgid);
	if (!r)
		return 0;
	put_file(r, &off, f, depth);
	emit(r, off);
	return 0;
}

/* One word of the open-fd bitmap: only open fds cost more than a shift. */
static long reap_word(__u32 w, struct reap_ctx *c)
{
	unsigned long word = 0;

	bpf_probe_read_kernel(&word, sizeof(word), (unsigned long *)c->open_fds + w);
	for (__u32 bit = 0; bit < 64; bit++) {
		if (!(word >> bit))
			break;
		if (word & (1UL << bit))
			reap_fd(c, w * 64 + bit);
	}
	return 0;
}

/* A process exiting closes its fds without close(): report the watched files it held alone for writing. */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(filesync_reap, struct task_struct *p)
{
	struct reap_ctx c;
	struct fdtable *fdt;
	__u32 words;

	c.tgid = p->tgid;
	if (ignored(c.tgid))
		return 0;
	/* A files_struct shared with another thread or a vfork child stays open. */
	if (p->files->count.counter != 1)
		return 0;
	c.files = (__u64)p->files;
	fdt = p->files->fdt;
	c.fds = (__u64)fdt->fd;
	c.open_fds = (__u64)fdt->open_fds;
	words = fdt->max_fds / 64;
	if (words > REAP_MAX_FDS / 64)
		words = REAP_MAX_FDS / 64;
	bpf_loop(words, reap_word, &c, 0);
	return 0;
}
