#!/usr/bin/env bash
# Builds the kernel (release) and its three boot images into target/images.
set -euo pipefail
cd "$(dirname "$0")/.."
export HV_GIT_REV="${HV_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
cargo build -q --locked -p hypervisor --target x86_64-unknown-none --release
cargo build -q --locked -p boot
./target/debug/boot image --kernel target/x86_64-unknown-none/release/hypervisor --out target/images >/dev/null
echo "images in target/images (bios.img, uefi.img, grub.iso)"
