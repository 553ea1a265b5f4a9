//! The kernel: the modules the guest needs, with their dependencies in load order, and the
//! uncompressed kernel that qemu can start directly.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::{Entry, Tree};
use crate::{elf, Error, Result};

/// A kernel module picked for the initramfs.
pub(super) struct Module {
    /// Path under `/lib/modules/<release>/`, uncompressed (`kernel/drivers/block/nbd.ko`).
    path: String,
    /// Its direct dependencies, by name.
    depends: Vec<String>,
    data: Vec<u8>,
}

/// The kernel's modules by name (`-` as `_`) and its built-in ones.
pub(super) struct ModuleIndex {
    dir: PathBuf,
    files: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    pub(super) fn new(kernel_root: &Path, release: &str) -> Result<ModuleIndex> {
        let dir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|base| kernel_root.join(base).join(release))
            .find(|dir| dir.is_dir())
            .ok_or_else(|| {
                Error::Image(format!("the kernel package has no modules for {release}"))
            })?;
        let mut files = BTreeMap::new();
        let mut pending = vec![dir.join("kernel")];
        while let Some(current) = pending.pop() {
            let entries = fs::read_dir(&current)
                .map_err(|e| Error::io(format!("list {}", current.display()), e))?;
            for entry in entries {
                let entry =
                    entry.map_err(|e| Error::io(format!("list {}", current.display()), e))?;
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                    continue;
                }
                let file = entry.file_name().to_string_lossy().into_owned();
                if let Some(name) = module_name(&file) {
                    let rel = path.strip_prefix(&dir).map_err(|_| {
                        Error::Image(format!("{} is outside {}", path.display(), dir.display()))
                    })?;
                    files.insert(name, rel.to_string_lossy().into_owned());
                }
            }
        }
        let builtin_list = dir.join("modules.builtin");
        let builtin = fs::read_to_string(&builtin_list)
            .map_err(|e| Error::io(format!("read {}", builtin_list.display()), e))?
            .lines()
            .filter_map(|line| line.rsplit('/').next().and_then(module_name))
            .collect();
        Ok(ModuleIndex {
            dir,
            files,
            builtin,
        })
    }

    fn read(&self, name: &str) -> Result<Module> {
        let rel = self
            .files
            .get(name)
            .ok_or_else(|| Error::Image(format!("the kernel has no module {name}")))?;
        let file = self.dir.join(rel);
        let (path, data) = if let Some(stem) = rel.strip_suffix(".xz") {
            (stem.to_string(), decompress("xz", &file)?)
        } else if let Some(stem) = rel.strip_suffix(".zst") {
            (stem.to_string(), decompress("zstd", &file)?)
        } else if let Some(stem) = rel.strip_suffix(".gz") {
            (stem.to_string(), decompress("gzip", &file)?)
        } else {
            let data =
                fs::read(&file).map_err(|e| Error::io(format!("read {}", file.display()), e))?;
            (rel.clone(), data)
        };
        let depends = elf::module_depends(&data)
            .map_err(|e| Error::Image(format!("read module {}: {e}", file.display())))?;
        Ok(Module {
            path,
            depends,
            data,
        })
    }
}

/// `nvme-tcp.ko.xz` → `nvme_tcp`.
fn module_name(file: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|suffix| file.strip_suffix(suffix))?;
    Some(stem.replace('-', "_"))
}

fn decompress(program: &str, file: &Path) -> Result<Vec<u8>> {
    let output = Command::new(program)
        .arg("-dc")
        .arg(file)
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::Missing {
                    program: program.to_string(),
                    hint: "the kernel's modules are compressed with it; install it \
                           (scripts/test.sh installs what the tests need)"
                        .to_string(),
                }
            } else {
                Error::io(format!("start {program} -dc {}", file.display()), e)
            }
        })?;
    if !output.status.success() {
        return Err(Error::Image(format!(
            "{program} -dc {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(output.stdout)
}

/// The modules to ship, dependencies first: (name, module, loaded at boot).
pub(super) fn resolve_modules(index: &ModuleIndex) -> Result<Vec<(String, Module, bool)>> {
    fn visit(
        index: &ModuleIndex,
        name: &str,
        at_boot: bool,
        seen: &mut HashSet<String>,
        out: &mut Vec<(String, Module, bool)>,
    ) -> Result<()> {
        if index.builtin.contains(name) {
            return Ok(());
        }
        if !seen.insert(name.to_string()) {
            if at_boot {
                // A module shipped for later turns out to be a dependency of one loaded at boot.
                if let Some(entry) = out.iter_mut().find(|(n, _, _)| n == name) {
                    entry.2 = true;
                }
            }
            return Ok(());
        }
        let module = index.read(name)?;
        for dependency in module.depends.clone() {
            visit(index, &dependency, at_boot, seen, out)?;
        }
        out.push((name.to_string(), module, at_boot));
        Ok(())
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for name in super::OPTIONAL_MODULES {
        if index.files.contains_key(*name) {
            visit(index, name, true, &mut seen, &mut out)?;
        }
    }
    for (name, at_boot) in super::MODULES {
        visit(index, name, *at_boot, &mut seen, &mut out)?;
    }
    Ok(out)
}

/// Puts `modules` (in load order) into the tree under `lib/modules/<release>/`, with a
/// `modules.dep` for `modprobe`, and the list of those loaded at boot in `etc/strata/modules`.
/// Returns that list.
pub(super) fn add_modules(
    tree: &mut Tree,
    release: &str,
    modules: &[(String, Module, bool)],
) -> String {
    let dir = format!("lib/modules/{release}");
    let position: HashMap<&str, usize> = modules
        .iter()
        .enumerate()
        .map(|(index, (name, _, _))| (name.as_str(), index))
        .collect();
    let mut boot_list = String::new();
    let mut modules_dep = String::new();
    for (_, module, at_boot) in modules {
        if *at_boot {
            boot_list.push_str(&module.path);
            boot_list.push('\n');
        }
        // Every dependency, direct or not; modprobe loads the last listed first.
        let mut closure = BTreeSet::new();
        let mut pending: Vec<&str> = module.depends.iter().map(String::as_str).collect();
        while let Some(dependency) = pending.pop() {
            if let Some(&index) = position.get(dependency) {
                if closure.insert(index) {
                    pending.extend(modules[index].1.depends.iter().map(String::as_str));
                }
            }
        }
        modules_dep.push_str(&module.path);
        modules_dep.push(':');
        for &index in closure.iter().rev() {
            modules_dep.push(' ');
            modules_dep.push_str(&modules[index].1.path);
        }
        modules_dep.push('\n');
        tree.insert(
            &format!("{dir}/{}", module.path),
            Entry::File {
                perm: 0o644,
                data: module.data.clone(),
            },
        );
    }
    tree.insert(
        &format!("{dir}/modules.dep"),
        Entry::File {
            perm: 0o644,
            data: modules_dep.into_bytes(),
        },
    );
    tree.insert(
        "etc/strata/modules",
        Entry::File {
            perm: 0o644,
            data: boot_list.clone().into_bytes(),
        },
    );
    boot_list
}

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the kernel's PVH entry point.
const PVH_ENTRY_NOTE: u32 = 18;

/// The uncompressed kernel (vmlinux) inside a bzImage, when it has a PVH entry point: qemu
/// starts such an ELF kernel at once, where a bzImage first decompresses itself under
/// emulation (some 20 s of every boot for Debian's XZ-compressed kernel). `None` when the
/// payload is in no known format or has no PVH entry; the bzImage is booted then.
pub(super) fn extract_pvh_kernel(vmlinuz: &Path, work: &Path) -> Result<Option<Vec<u8>>> {
    const FORMATS: &[(&[u8], &str, &[&str])] = &[
        (b"\xfd7zXZ\x00", "xz", &["-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dc"]),
        (b"\x1f\x8b\x08\x00", "gzip", &["-dc"]),
    ];
    let data =
        fs::read(vmlinuz).map_err(|e| Error::io(format!("read {}", vmlinuz.display()), e))?;
    for (magic, program, args) in FORMATS {
        let Some(at) = data
            .windows(magic.len())
            .position(|window| window == *magic)
        else {
            continue;
        };
        let payload = work.join("kernel-payload");
        fs::write(&payload, &data[at..])
            .map_err(|e| Error::io(format!("write {}", payload.display()), e))?;
        // The payload is followed by other data, which gzip and zstd complain about after
        // writing everything: the exit status does not tell, the ELF check below does.
        let output = Command::new(program)
            .args(*args)
            .arg(&payload)
            .output()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::Missing {
                        program: program.to_string(),
                        hint: format!(
                            "the kernel is compressed with it; install it (scripts/test.sh \
                             installs {program})"
                        ),
                    }
                } else {
                    Error::io(format!("start {program}"), e)
                }
            })?;
        let kernel = output.stdout;
        if elf::is_elf(&kernel) && elf::has_note(&kernel, "Xen", PVH_ENTRY_NOTE).unwrap_or(false) {
            return Ok(Some(kernel));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_are_normalized() {
        assert_eq!(module_name("nvme-tcp.ko").as_deref(), Some("nvme_tcp"));
        assert_eq!(module_name("ext4.ko.xz").as_deref(), Some("ext4"));
        assert_eq!(module_name("modules.dep"), None);
    }
}
