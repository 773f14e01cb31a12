/* The iterator over the agent's own mappings, for the objects that attach uprobes inside
 * containers (uprobes, http): included by their .bpf.c files, after podscope.h. */
#ifndef PODSCOPE_MAPPED_FILES_BPF_H
#define PODSCOPE_MAPPED_FILES_BPF_H

/* Run by the agent (for `container:` entries) to learn which file the kernel sees behind its own
 * mappings: for each file-backed mapping of the agent's process, its start, and the device and
 * inode of the file behind it. On overlayfs that is the layer's file, the one uprobes attach to,
 * whichever overlay mount the agent opened it through. */
SEC("iter/task_vma")
int podscope_uprobe_mapped_files(struct bpf_iter__task_vma *ctx)
{
	struct vm_area_struct *vma = ctx->vma;
	struct task_struct *task = ctx->task;
	if (!vma || !task || task->tgid != agent_tgid)
		return 0;
	struct file *file = vma->vm_file;
	if (!file)
		return 0;
	struct podscope_mapped_file out = {
		.start = vma->vm_start,
		.ino = file->f_inode->i_ino,
		.dev = file->f_inode->i_sb->s_dev,
	};
	bpf_seq_write(ctx->meta->seq, &out, sizeof(out));
	return 0;
}

#endif
