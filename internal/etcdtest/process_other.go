//go:build !unix

package etcdtest

import "os/exec"

// setProcessGroup does nothing: process groups are a Unix notion.
func setProcessGroup(*exec.Cmd) {}

// killProcessGroup kills the process cmd started.
func killProcessGroup(cmd *exec.Cmd) { _ = cmd.Process.Kill() }

// lockFile does not lock: concurrent builds of one release may both link.
func lockFile(string) (func(), error) { return func() {}, nil }
