/* SPDX-License-Identifier: MIT OR GPL-2.0 */
/*
 * The few kernel types watcher.bpf.c reads, written by hand instead of a vmlinux.h
 * generated from the build machine's kernel, so that the object is the same wherever
 * it is built. Every struct lists only the fields the program uses: with
 * preserve_access_index, clang records each access as a CO-RE relocation by field
 * name, and the loader (aya) rewrites the offsets against the running kernel's BTF.
 */
#ifndef FILESYNC_KERNEL_H
#define FILESYNC_KERNEL_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;
typedef long long __s64;
/* bpf_helper_defs.h names these in prototypes of helpers this program never calls. */
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;

typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

/* The map types and flags of include/uapi/linux/bpf.h; their values are ABI. */
enum {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_RINGBUF = 27,
};
#define BPF_ANY 0

#define KERNEL_STRUCT __attribute__((preserve_access_index))

struct pt_regs {
	unsigned long r10;
	unsigned long r9;
	unsigned long r8;
	unsigned long dx;
	unsigned long si;
	unsigned long di;
	unsigned long orig_ax;
} KERNEL_STRUCT;

struct thread_info {
	__u32 status;
} KERNEL_STRUCT;

struct super_block {
	__u32 s_dev;
} KERNEL_STRUCT;

struct inode {
	__u16 i_mode;
	struct super_block *i_sb;
	unsigned long i_ino;
	unsigned int i_nlink;
	__s64 i_size;
} KERNEL_STRUCT;

struct qstr {
	__u32 len;
	const unsigned char *name;
} KERNEL_STRUCT;

struct dentry {
	struct dentry *d_parent;
	struct qstr d_name;
	struct inode *d_inode;
	struct super_block *d_sb;
} KERNEL_STRUCT;

struct path {
	struct dentry *dentry;
} KERNEL_STRUCT;

/* Since 6.13 the reference count is a file_ref_t holding "references - 1". */
typedef struct {
	__s64 counter;
} atomic64_t;

typedef struct {
	atomic64_t refcnt;
} file_ref_t;

struct file {
	__u32 f_mode;
	struct inode *f_inode;
	__u32 f_flags;
	struct path f_path;
	__s64 f_pos;
	file_ref_t f_ref;
} KERNEL_STRUCT;

/* Before 6.13 the reference count was a plain counter. */
struct file___pre_6_13 {
	atomic64_t f_count;
} KERNEL_STRUCT;

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
	unsigned long *open_fds;
} KERNEL_STRUCT;

typedef struct {
	int counter;
} atomic_t;

struct files_struct {
	atomic_t count;
	struct fdtable *fdt;
} KERNEL_STRUCT;

struct fs_struct {
	struct path pwd;
} KERNEL_STRUCT;

struct task_struct {
	struct thread_info thread_info;
	int tgid;
	struct fs_struct *fs;
	struct files_struct *files;
} KERNEL_STRUCT;

#endif
