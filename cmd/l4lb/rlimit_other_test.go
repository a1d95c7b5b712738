//go:build !amd64

package main

import "errors"

// denyRlimitChanges is written for amd64 (rlimit_amd64_test.go), where
// the test that needs it runs.
func denyRlimitChanges() error {
	return errors.New("the seccomp filter of denyRlimitChanges is written for amd64")
}
