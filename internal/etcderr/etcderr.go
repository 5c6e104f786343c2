// Package etcderr classifies the errors etcd (or gRPC on its behalf)
// answers, for every package of this module that retries requests: an
// error that the same request will get again ends the retries.
package etcderr

import (
	"errors"
	"fmt"
	"strings"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// MaxLeaseTTL is the longest lease TTL etcd grants, in seconds (the
// server's lease.MaxLeaseTTL): a Grant over it fails with
// rpctypes.ErrLeaseTTLTooLarge, every time.
const MaxLeaseTTL = 9_000_000_000

// EndsRetries reports whether a request of client that failed with err
// fails the same way again: the client was closed, or err is Permanent.
func EndsRetries(client *clientv3.Client, err error) bool {
	return ClientClosed(client) || Permanent(err)
}

// ClientClosed reports whether client was closed (nil: not known).
func ClientClosed(client *clientv3.Client) bool {
	return client != nil && client.Ctx() != nil && client.Ctx().Err() != nil
}

// Permanent reports whether err is an answer of etcd (or of gRPC on
// its behalf) that the same request will get again.
func Permanent(err error) bool {
	for _, p := range []error{
		rpctypes.ErrPermissionDenied, rpctypes.ErrAuthFailed, rpctypes.ErrUserEmpty,
		rpctypes.ErrUserNotFound, rpctypes.ErrRoleNotGranted, rpctypes.ErrPermissionNotGranted,
		rpctypes.ErrDuplicateKey, rpctypes.ErrEmptyKey, rpctypes.ErrKeyNotFound,
		rpctypes.ErrInvalidSortOption, rpctypes.ErrRequestTooLarge, rpctypes.ErrTooManyOps,
		rpctypes.ErrLeaseTTLTooLarge,
	} {
		if errors.Is(err, p) {
			return true
		}
	}
	// Errors etcd's server knows arrive as rpctypes.EtcdError (above); a raw
	// gRPC status comes from gRPC itself, such as a request or a response
	// over a receive limit.
	if MessageTooLarge(err) {
		return true
	}
	if s, ok := status.FromError(err); ok {
		switch s.Code() {
		case codes.PermissionDenied, codes.Unauthenticated, codes.InvalidArgument:
			return true
		}
	}
	return false
}

// LeaseNotFound reports whether err says the request's lease is gone
// (revoked, or expired).
func LeaseNotFound(err error) bool { return errors.Is(err, rpctypes.ErrLeaseNotFound) }

// MessageTooLarge reports whether gRPC refused a message over a size
// limit (a request over the server's, or a response over the client's).
func MessageTooLarge(err error) bool {
	s, ok := status.FromError(err)
	return ok && s.Code() == codes.ResourceExhausted && strings.Contains(s.Message(), "larger than max")
}

// ReceivedTooLarge returns the size of the message that a receiver of gRPC
// refused as over its limit ("received message larger than max (X vs.
// Y)"): the server's for a request, the client's for a response; false
// when err is no such refusal or does not say the size.
func ReceivedTooLarge(err error) (int64, bool) {
	s, ok := status.FromError(err)
	if !ok || s.Code() != codes.ResourceExhausted {
		return 0, false
	}
	const marker = "received message larger than max ("
	i := strings.Index(s.Message(), marker)
	if i < 0 {
		return 0, false
	}
	var size, limit int64
	if _, err := fmt.Sscanf(s.Message()[i+len(marker):], "%d vs. %d)", &size, &limit); err != nil {
		return 0, false
	}
	return size, true
}
