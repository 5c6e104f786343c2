package etcdtest

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// AuthRole is a role EnableAuth creates, with Perm on every key under each
// of Prefixes (a prefix is taken as it is: end it with "/" to cover a
// directory).
type AuthRole struct {
	Name     string
	Perm     clientv3.PermissionType
	Prefixes []string
}

// AuthUser is a user EnableAuth creates, with Password and Roles.
type AuthUser struct {
	Name, Password string
	Roles          []string
}

// EnableAuth creates the user root (role root, password rootPassword), then
// roles and users, through cli, and turns authentication on. cli must not
// use authentication yet.
func EnableAuth(ctx context.Context, cli *clientv3.Client, rootPassword string, roles []AuthRole, users []AuthUser) error {
	steps := []func() error{
		func() error { _, err := cli.UserAdd(ctx, "root", rootPassword); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err },
	}
	for _, r := range roles {
		steps = append(steps, func() error { _, err := cli.RoleAdd(ctx, r.Name); return err })
		for _, p := range r.Prefixes {
			steps = append(steps, func() error {
				_, err := cli.RoleGrantPermission(ctx, r.Name, p, clientv3.GetPrefixRangeEnd(p), r.Perm)
				return err
			})
		}
	}
	for _, u := range users {
		steps = append(steps, func() error { _, err := cli.UserAdd(ctx, u.Name, u.Password); return err })
		for _, r := range u.Roles {
			steps = append(steps, func() error { _, err := cli.UserGrantRole(ctx, u.Name, r); return err })
		}
	}
	steps = append(steps, func() error { _, err := cli.AuthEnable(ctx); return err })
	for i, step := range steps {
		if err := step(); err != nil {
			return fmt.Errorf("etcdtest: enable auth, step %d: %w", i, err)
		}
	}
	return nil
}
