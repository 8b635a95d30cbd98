//! A small disk of its own: a tmpfs mounted for one test (root only), to see what regtee does
//! when the disk fills.

use std::path::{Path, PathBuf};

use super::text;

/// A tmpfs of `size` at `dir`, unmounted on drop.
pub struct SmallDisk(pub PathBuf);

impl SmallDisk {
    pub fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            text(&out)
        );
        SmallDisk(dir.to_path_buf())
    }

    /// Takes all the space left.
    pub fn fill(&self) {
        let _ = std::fs::remove_file(self.0.join("filler"));
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        use std::io::Write as _;
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let small = vec![0u8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
    }

    pub fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: a server of a failed test may still hold files there, and a mount left
        // behind would keep the run's directory from being deleted.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}
