//! The guest: a Debian kernel and an initramfs assembled from Debian packages, built once and
//! cached.
//!
//! ```text
//! apt-cache: linux-image-amd64 → linux-image-6.1.0-N-amd64; candidate versions → cache key
//! target/vm-cache/.lock (flock) ─► target/vm-cache/<key>/{vmlinux, initramfs.cpio, manifest.txt}
//!   apt-get download ─► dpkg-deb -x ─► vmlinuz ─► xz -d ─► vmlinux (qemu starts it directly)
//!                                  ─► kernel modules (+ .modinfo depends, in load order)
//!                                  ─► tools (+ the shared libraries they need, found through
//!                                     DT_NEEDED and fetched from their packages' Depends)
//!                                  ─► busybox and its applet links, init.sh ─► newc cpio
//! ```
//!
//! The cache directory is `$STRATA_VM_CACHE` if set, else `vm-cache/` in the cargo target
//! directory of the running test (which follows `CARGO_TARGET_DIR`). Packages are those APT
//! would install on this machine; the key changes with their versions and with this harness's
//! lists, so an updated kernel or tool rebuilds the image.

mod apt;
mod kernel;
mod userland;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use self::apt::{Apt, Stage};
use crate::cpio::Tree;
use crate::{Error, Result};

/// Bumped when the layout of the image changes in a way the lists below do not show.
const FORMAT: u32 = 2;

/// The guest's init script.
const INIT: &str = include_str!("init.sh");

/// Kernel modules in the initramfs: (name, loaded at boot). Dependencies come along (from each
/// module's `.modinfo`); modules the kernel has built in are skipped. Modules not loaded at boot
/// take parameters when loaded (`Vm::modprobe`).
const MODULES: &[(&str, bool)] = &[
    ("crc32c_generic", true), // ext4 and jbd2 checksums, NVMe/TCP digests: "crc32c" by name
    ("virtio_pci", true),
    ("virtio_net", true),
    ("virtio_blk", true),
    ("configfs", true),
    ("loop", true),
    ("ext4", true),
    ("nbd", true),
    ("nvme_core", true),
    ("nvme_fabrics", true),
    ("nvme_tcp", true),
    ("nvmet", true),
    ("nvmet_tcp", true),
    ("sd_mod", true),
    ("scsi_transport_iscsi", true),
    ("libiscsi", true),
    ("iscsi_tcp", true),
    ("brd", false), // ramdisks: size and count are parameters
];

/// Crypto providers loaded before the modules above when the kernel ships them as modules, so
/// that what asks for the algorithm by name finds it (there is no modprobe for aliases).
const OPTIONAL_MODULES: &[&str] = &["crct10dif_generic", "crc64_rocksoft_generic"];

/// A program (or file) from a Debian package, at its path in that package.
pub(crate) struct Tool {
    pub(crate) package: &'static str,
    pub(crate) files: &'static [&'static str],
}

/// The guest's programs besides busybox (which provides sh and the usual applets).
const TOOLS: &[Tool] = &[
    Tool {
        package: "nbd-client",
        files: &["sbin/nbd-client"],
    },
    Tool {
        package: "nvme-cli",
        files: &["usr/sbin/nvme"],
    },
    Tool {
        package: "e2fsprogs",
        files: &[
            "sbin/mke2fs",
            "sbin/mkfs.ext4",
            "sbin/e2fsck",
            "sbin/fsck.ext4",
            "sbin/resize2fs",
            "sbin/tune2fs",
            "sbin/dumpe2fs",
            "etc/mke2fs.conf",
        ],
    },
    Tool {
        package: "util-linux",
        files: &["sbin/fstrim", "sbin/blockdev", "sbin/blkdiscard"],
    },
    // GNU dd, whose options (status=, iflag=count_bytes, oflag=dsync, …) are the ones people
    // write; busybox's handles O_DIRECT too, with fewer options.
    Tool {
        package: "coreutils",
        files: &["bin/dd"],
    },
];

const BUSYBOX_PACKAGE: &str = "busybox-static";
const KERNEL_META_PACKAGE: &str = "linux-image-amd64";

/// A built guest: what qemu boots.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel: `vmlinux` (uncompressed, started through its PVH entry point) when it could
    /// be taken out of the packaged `vmlinuz`, else that `vmlinuz`.
    pub kernel: PathBuf,
    /// The initramfs (uncompressed newc cpio).
    pub initramfs: PathBuf,
    /// The kernel's release (`uname -r` in the guest), e.g. `6.1.0-57-amd64`.
    pub kernel_release: String,
    /// The Debian packages it was built from: (name, version).
    pub packages: Vec<(String, String)>,
}

/// The guest image for this machine's package versions: built on first use, then taken from
/// the cache.
pub fn prepare() -> Result<GuestImage> {
    static PREPARED: Mutex<Option<GuestImage>> = Mutex::new(None);
    let mut prepared = PREPARED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(image) = prepared.as_ref() {
        return Ok(image.clone());
    }
    let root = cache_root();
    fs::create_dir_all(&root)
        .map_err(|e| Error::io(format!("create the VM cache {}", root.display()), e))?;
    let built = |plan: &Plan| root.join(plan.key()).join("ok").exists();
    let plan = match Plan::remembered(&root).filter(built) {
        Some(plan) => plan,
        None => {
            // Several test binaries may start at once: one asks APT and builds, the others
            // wait here and then find the image.
            let lock_path = root.join(".lock");
            let lock = fs::File::create(&lock_path)
                .map_err(|e| Error::io(format!("create {}", lock_path.display()), e))?;
            lock.lock()
                .map_err(|e| Error::io(format!("lock {}", lock_path.display()), e))?;
            let apt = Apt::new(&root)?;
            let plan = Plan::find(&root, &apt)?;
            if !built(&plan) {
                let out = root.join(plan.key());
                eprintln!(
                    "strata-testkit: building the test VM image in {} (once per package versions)",
                    out.display()
                );
                let work = root.join(format!("{}.build", plan.key()));
                let result = build(&plan, apt, &work, &out);
                let _ = fs::remove_dir_all(&work);
                result?;
                prune(&root, &plan.key());
            }
            plan
        }
    };
    let out = root.join(plan.key());
    let kernel = if out.join("vmlinux").exists() {
        out.join("vmlinux")
    } else {
        out.join("vmlinuz")
    };
    let image = GuestImage {
        kernel,
        initramfs: out.join("initramfs.cpio"),
        kernel_release: plan.kernel_release.clone(),
        packages: plan.versions.clone().into_iter().collect(),
    };
    *prepared = Some(image.clone());
    Ok(image)
}

/// Removes images and plans other than `keep` (older package versions), and what an
/// interrupted build left. Called with the lock held, after a build.
fn prune(root: &Path, keep: &str) {
    let current_plan = format!("plan-{:016x}", apt_fingerprint());
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.filter_map(|entry| entry.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with("plan-") && name != current_plan {
            let _ = fs::remove_file(&path);
        } else if name != keep && name != "apt" && path.is_dir() && is_image_dir(&name) {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// `<release>-<16 hex digits>`, optionally `.build` or `.tmp`: a directory [`prepare`] made.
fn is_image_dir(name: &str) -> bool {
    let stem = name
        .strip_suffix(".build")
        .or_else(|| name.strip_suffix(".tmp"))
        .unwrap_or(name);
    !name.starts_with("plan-")
        && stem.rsplit_once('-').is_some_and(|(release, hash)| {
            !release.is_empty() && hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit())
        })
}

/// Which packages, at which versions.
struct Plan {
    kernel_package: String,
    kernel_release: String,
    /// Top-level packages (kernel, busybox, tools) → candidate version.
    versions: BTreeMap<String, String>,
}

impl Plan {
    /// The plan remembered for APT's current package lists, if any.
    fn remembered(root: &Path) -> Option<Plan> {
        Plan::load(&root.join(format!("plan-{:016x}", apt_fingerprint())))
    }

    /// The plan for APT's current package lists: remembered in the cache (asking APT takes
    /// seconds), else asked for and remembered.
    fn find(root: &Path, apt: &Apt) -> Result<Plan> {
        if let Some(plan) = Plan::remembered(root) {
            return Ok(plan);
        }
        let plan = match Plan::query(apt) {
            Ok(plan) => plan,
            Err(first) => {
                // A fresh machine may have no package lists yet.
                if !apt.update_once()? {
                    return Err(first);
                }
                Plan::query(apt)?
            }
        };
        // Under the fingerprint of the lists the answer came from (an update changes it).
        let remembered = root.join(format!("plan-{:016x}", apt_fingerprint()));
        let staging = remembered.with_extension("tmp");
        fs::write(&staging, plan.to_text())
            .and_then(|()| fs::rename(&staging, &remembered))
            .map_err(|e| Error::io(format!("write {}", remembered.display()), e))?;
        Ok(plan)
    }

    fn to_text(&self) -> String {
        let mut text = format!(
            "kernel_package {}\nkernel_release {}\n",
            self.kernel_package, self.kernel_release
        );
        for (name, version) in &self.versions {
            text.push_str(&format!("version {name} {version}\n"));
        }
        text
    }

    fn load(path: &Path) -> Option<Plan> {
        let text = fs::read_to_string(path).ok()?;
        let mut kernel_package = None;
        let mut kernel_release = None;
        let mut versions = BTreeMap::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("kernel_package"), Some(name), None) => {
                    kernel_package = Some(name.to_string())
                }
                (Some("kernel_release"), Some(release), None) => {
                    kernel_release = Some(release.to_string())
                }
                (Some("version"), Some(name), Some(version)) => {
                    versions.insert(name.to_string(), version.to_string());
                }
                _ => return None,
            }
        }
        Some(Plan {
            kernel_package: kernel_package?,
            kernel_release: kernel_release?,
            versions,
        })
    }

    fn query(apt: &Apt) -> Result<Plan> {
        let kernel_package = apt.kernel_package(KERNEL_META_PACKAGE)?;
        let kernel_release = kernel_package
            .strip_prefix("linux-image-")
            .unwrap_or(&kernel_package)
            .to_string();
        let mut packages = vec![kernel_package.clone(), BUSYBOX_PACKAGE.to_string()];
        packages.extend(TOOLS.iter().map(|tool| tool.package.to_string()));
        let versions = apt.candidate_versions(&packages)?;
        Ok(Plan {
            kernel_package,
            kernel_release,
            versions,
        })
    }

    /// The cache directory's name: the kernel release and a hash of everything that shapes the
    /// image.
    fn key(&self) -> String {
        let mut hash = Fnv::new();
        hash.write(&FORMAT.to_le_bytes());
        hash.write(INIT.as_bytes());
        for (name, version) in &self.versions {
            hash.write(name.as_bytes());
            hash.write(version.as_bytes());
        }
        for (module, at_boot) in MODULES {
            hash.write(module.as_bytes());
            hash.write(&[u8::from(*at_boot)]);
        }
        for module in OPTIONAL_MODULES {
            hash.write(module.as_bytes());
        }
        for tool in TOOLS {
            hash.write(tool.package.as_bytes());
            for file in tool.files {
                hash.write(file.as_bytes());
            }
        }
        format!("{}-{:016x}", self.kernel_release, hash.finish())
    }
}

/// A hash of what decides APT's candidates (package lists, sources, pins: names, sizes and
/// modification times) and of the packages the plan asks about.
fn apt_fingerprint() -> u64 {
    let mut hash = Fnv::new();
    hash.write(&FORMAT.to_le_bytes());
    hash.write(KERNEL_META_PACKAGE.as_bytes());
    hash.write(BUSYBOX_PACKAGE.as_bytes());
    for tool in TOOLS {
        hash.write(tool.package.as_bytes());
    }
    let mut files = Vec::new();
    for place in [
        "/var/lib/apt/lists",
        "/etc/apt/sources.list",
        "/etc/apt/sources.list.d",
        "/etc/apt/preferences",
        "/etc/apt/preferences.d",
    ] {
        let place = Path::new(place);
        match fs::read_dir(place) {
            Ok(entries) => files.extend(entries.filter_map(|entry| entry.ok()).map(|e| e.path())),
            Err(_) => files.push(place.to_path_buf()),
        }
    }
    files.sort();
    for file in files {
        hash.write(file.as_os_str().as_encoded_bytes());
        if let Ok(meta) = fs::metadata(&file) {
            hash.write(&meta.len().to_le_bytes());
            if let Ok(modified) = meta.modified() {
                if let Ok(since) = modified.duration_since(std::time::UNIX_EPOCH) {
                    hash.write(&since.as_nanos().to_le_bytes());
                }
            }
        }
    }
    hash.finish()
}

/// FNV-1a (64-bit): a stable hash for the cache key.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate fields, so ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("STRATA_VM_CACHE") {
        return PathBuf::from(dir);
    }
    target_dir().join("vm-cache")
}

/// The cargo target directory of the running test binary (`target/debug/deps/test-…`): the
/// nearest ancestor holding cargo's `CACHEDIR.TAG`.
fn target_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe
            .ancestors()
            .skip(1)
            .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        {
            return dir.to_path_buf();
        }
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target")
}

fn build(plan: &Plan, apt: Apt, work: &Path, out: &Path) -> Result<()> {
    let mut stage = Stage::new(apt, work)?;
    let specs: Vec<String> = plan
        .versions
        .iter()
        .map(|(name, version)| format!("{name}={version}"))
        .collect();
    stage.fetch(&specs)?;

    let mut tree = Tree::new();
    userland::add_base(&mut tree, INIT);
    let kernel_root = stage.root(&plan.kernel_package)?.to_path_buf();
    let index = kernel::ModuleIndex::new(&kernel_root, &plan.kernel_release)?;
    let modules = kernel::resolve_modules(&index)?;
    let boot_modules = kernel::add_modules(&mut tree, &plan.kernel_release, &modules);
    let (tool_names, libraries) = userland::add_tools(&mut tree, &mut stage, TOOLS)?;
    userland::add_busybox(&mut tree, &stage, BUSYBOX_PACKAGE, &tool_names)?;

    // Write the result next to its final place, then move it there in one step.
    let mut staging = out.as_os_str().to_owned();
    staging.push(".tmp");
    let staging = PathBuf::from(staging);
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)
        .map_err(|e| Error::io(format!("create {}", staging.display()), e))?;
    let vmlinuz = kernel_root
        .join("boot")
        .join(format!("vmlinuz-{}", plan.kernel_release));
    match kernel::extract_pvh_kernel(&vmlinuz, work)? {
        Some(vmlinux) => fs::write(staging.join("vmlinux"), vmlinux)
            .map_err(|e| Error::io("write the uncompressed kernel", e))?,
        None => {
            fs::copy(&vmlinuz, staging.join("vmlinuz"))
                .map_err(|e| Error::io(format!("copy {}", vmlinuz.display()), e))?;
        }
    }
    let initramfs = staging.join("initramfs.cpio");
    fs::write(&initramfs, tree.to_newc())
        .map_err(|e| Error::io(format!("write {}", initramfs.display()), e))?;
    let mut manifest = String::from("# packages\n");
    for (package, deb) in &stage.files {
        manifest.push_str(&format!("{package} {deb}\n"));
    }
    manifest.push_str("# modules loaded at boot, in order\n");
    manifest.push_str(&boot_modules);
    manifest.push_str("# shared libraries\n");
    for (soname, owner) in &libraries {
        manifest.push_str(&format!("{soname} ({owner})\n"));
    }
    fs::write(staging.join("manifest.txt"), manifest)
        .map_err(|e| Error::io("write the image manifest", e))?;
    fs::write(staging.join("ok"), b"").map_err(|e| Error::io("mark the image complete", e))?;
    let _ = fs::remove_dir_all(out);
    fs::rename(&staging, out)
        .map_err(|e| Error::io(format!("move the image to {}", out.display()), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_directories_are_recognized() {
        assert!(is_image_dir("6.1.0-57-amd64-e0dfd0e77fdb3f06"));
        assert!(is_image_dir("6.1.0-57-amd64-e0dfd0e77fdb3f06.build"));
        assert!(is_image_dir("6.1.0-57-amd64-e0dfd0e77fdb3f06.tmp"));
        assert!(!is_image_dir("apt"));
        assert!(!is_image_dir("plan-e0dfd0e77fdb3f06"));
        assert!(!is_image_dir("6.1.0-57-amd64"));
    }

    #[test]
    fn plans_are_remembered_as_text() {
        let plan = Plan {
            kernel_package: "linux-image-6.1.0-1-amd64".into(),
            kernel_release: "6.1.0-1-amd64".into(),
            versions: [
                ("nbd-client".to_string(), "1:3.24-1.1".to_string()),
                ("nvme-cli".to_string(), "2.4+really2.3-3".to_string()),
            ]
            .into(),
        };
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("plan");
        fs::write(&path, plan.to_text()).expect("write");
        let loaded = Plan::load(&path).expect("load");
        assert_eq!(loaded.key(), plan.key());
        assert_eq!(loaded.versions, plan.versions);
        fs::write(&path, "kernel_package x\ngarbage\n").expect("write");
        assert!(Plan::load(&path).is_none());
    }

    #[test]
    fn the_key_changes_with_versions() {
        let plan = |version: &str| Plan {
            kernel_package: "linux-image-6.1.0-1-amd64".into(),
            kernel_release: "6.1.0-1-amd64".into(),
            versions: [("nbd-client".to_string(), version.to_string())].into(),
        };
        assert_ne!(plan("1").key(), plan("2").key());
        assert_eq!(plan("1").key(), plan("1").key());
        assert!(plan("1").key().starts_with("6.1.0-1-amd64-"));
    }
}
