/* The few kernel types the programs touch, trimmed from
 * `bpftool btf dump file /sys/kernel/btf/vmlinux format c` (6.18) and from
 * the kvm/kvm_amd/kvm_intel module BTF layouts. Every struct carries
 * preserve_access_index, so field offsets are relocated by libbpf against
 * the running kernel's (or module's) BTF at load time: the build never
 * depends on the build host's kernel. Only the named fields matter. */
#ifndef OVERHEAD_VMLINUX_MIN_H
#define OVERHEAD_VMLINUX_MIN_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __u64 u64;
typedef __s32 s32;
typedef __s64 s64;
typedef _Bool bool;
enum { false = 0, true = 1 };
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_HASH = 5,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_TASK_STORAGE = 29,
};

enum {
	BPF_F_NO_PREALLOC = 1,
};

enum {
	BPF_LOCAL_STORAGE_GET_F_CREATE = 1,
};

enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
	BPF_EXIST = 2,
};

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct kernfs_node {
	u64 id;
};

struct cgroup {
	struct kernfs_node *kn;
};

struct css_set {
	struct cgroup *dfl_cgrp;
};

struct task_struct {
	unsigned int __state;
	int pid;
	int tgid;
	struct css_set *cgroups;
};

struct kvm_vcpu {
	int vcpu_id;
};

/* kvm_amd */
struct vmcb_control_area {
	u32 exit_code;
};

struct vmcb {
	struct vmcb_control_area control;
};

struct vcpu_svm {
	struct kvm_vcpu vcpu;
	struct vmcb *vmcb;
};

/* kvm_intel */
union vmx_exit_reason {
	u32 full;
};

struct vcpu_vmx {
	struct kvm_vcpu vcpu;
	union vmx_exit_reason exit_reason;
};

/* kvm_intel from Linux 6.16: the fields VMX shares with TDX moved into
 * `struct vcpu_vt vt` (exit_reason among them). */
struct vcpu_vt {
	union vmx_exit_reason exit_reason;
};

struct vcpu_vmx___vt {
	struct kvm_vcpu vcpu;
	struct vcpu_vt vt;
};

#pragma clang attribute pop

#endif
