"""REST routing (SPEC 4.1, 4.2): templates, params, 404 vs 405, conflicts, precedence."""

from __future__ import annotations

import pytest

from tlvproxy.config.model import CommandSpec, HttpRouteSpec
from tlvproxy.errors import MethodNotAllowed, RouteNotFound
from tlvproxy.routing import (
    InvalidTemplate,
    RouteConflict,
    Router,
    parse_template,
    route_problems,
    template_params,
)


def cmd(name, method, path):
    return CommandSpec(
        name=name,
        command=0x1000,  # routing ignores numbers; the loader checks they are unique
        upstream="im",
        http=HttpRouteSpec(method=method, path=path),
    )


@pytest.fixture
def router():
    return Router.build(
        [
            cmd("send", "POST", "/v1/messages"),
            cmd("list", "GET", "/v1/messages"),
            cmd("profile", "GET", "/v1/users/{user_id}/profile"),
            cmd("me", "GET", "/v1/users/me/profile"),
            cmd("delete_user", "DELETE", "/v1/users/{uid}"),
            cmd("pair", "GET", "/v1/rooms/{room}/members/{member}"),
            cmd("root", "GET", "/"),
            cmd("slash", "GET", "/v1/dir/"),
            CommandSpec(name="ws_only", command=0x3000, upstream="im"),
        ]
    )


def test_static_routes(router):
    match = router.match("POST", "/v1/messages")
    assert match.route.command.name == "send"
    assert match.route.template == "/v1/messages"
    assert match.params == {}
    assert router.match("GET", "/v1/messages").route.command.name == "list"
    assert router.match("GET", "/").route.command.name == "root"


def test_path_params(router):
    match = router.match("GET", "/v1/users/42/profile")
    assert match.route.command.name == "profile"
    assert match.params == {"user_id": "42"}
    assert router.match("DELETE", "/v1/users/7").params == {"uid": "7"}
    assert router.match("GET", "/v1/rooms/r1/members/ann").params == {
        "room": "r1",
        "member": "ann",
    }
    # A decoded path may hold any character in a parameter, spaces and unicode too.
    assert router.match("GET", "/v1/users/a b é/profile").params == {"user_id": "a b é"}


def test_literal_beats_parameter(router):
    assert router.match("GET", "/v1/users/me/profile").route.command.name == "me"
    assert router.match("GET", "/v1/users/mee/profile").route.command.name == "profile"


def test_not_found(router):
    for path in ("/v2/messages", "/v1/messages/x", "/v1/users//profile", "/v1/dir", "", "v1"):
        with pytest.raises(RouteNotFound):
            router.match("GET", path)


def test_trailing_slash_is_significant(router):
    assert router.match("GET", "/v1/dir/").route.command.name == "slash"
    with pytest.raises(RouteNotFound):
        router.match("GET", "/v1/messages/")


def test_method_not_allowed_lists_sorted_methods(router):
    with pytest.raises(MethodNotAllowed) as caught:
        router.match("PUT", "/v1/messages")
    assert caught.value.allow == ("GET", "POST")
    assert caught.value.headers() == [("Allow", "GET, POST")]
    assert caught.value.http_status == 405
    with pytest.raises(MethodNotAllowed) as caught:
        router.match("POST", "/v1/users/9")
    assert caught.value.allow == ("DELETE",)


def test_method_falls_back_to_a_parameter_route_of_that_method(router):
    # /v1/users/me/profile exists for GET only through the literal route, but a
    # DELETE on /v1/users/me finds the parameter route.
    assert router.match("DELETE", "/v1/users/me").params == {"uid": "me"}


def test_head_is_not_get(router):
    with pytest.raises(MethodNotAllowed) as caught:
        router.match("HEAD", "/v1/users/1/profile")
    assert caught.value.allow == ("GET",)


def test_routes_lists_only_http_commands(router):
    assert [r.command.name for r in router.routes] == [
        "send",
        "list",
        "profile",
        "me",
        "delete_user",
        "pair",
        "root",
        "slash",
    ]


def test_same_template_for_two_methods_is_fine():
    Router.build([cmd("a", "GET", "/v1/a/{x}"), cmd("b", "PUT", "/v1/a/{y}")])


def test_duplicate_template_up_to_param_names_conflicts():
    with pytest.raises(RouteConflict) as caught:
        Router.build([cmd("a", "GET", "/v1/a/{x}"), cmd("b", "GET", "/v1/a/{y}")])
    assert str(caught.value) == "GET /v1/a/{y} (b) duplicates GET /v1/a/{x} (a)"


def test_exact_duplicate_conflicts():
    with pytest.raises(RouteConflict, match=r"POST /m \(b\) duplicates POST /m \(a\)"):
        Router.build([cmd("a", "POST", "/m"), cmd("b", "POST", "/m")])


def test_crossing_parameters_are_ambiguous():
    with pytest.raises(RouteConflict) as caught:
        Router.build([cmd("a", "GET", "/a/{x}/c"), cmd("b", "GET", "/a/b/{y}")])
    assert str(caught.value) == (
        "GET /a/b/{y} (b) and GET /a/{x}/c (a) are ambiguous: both match some paths and "
        "neither is more specific"
    )


def test_route_problems_reports_every_problem_with_its_command():
    commands = [
        cmd("a", "GET", "/a/{x}"),
        cmd("b", "GET", "/a/{y}"),
        cmd("c", "GET", "no-slash"),
        cmd("d", "GET", "/a/{z}"),
    ]
    problems = [(c.name, type(e).__name__) for c, e in route_problems(commands)]
    assert problems == [
        ("b", "RouteConflict"),
        ("c", "InvalidTemplate"),
        ("d", "RouteConflict"),
        ("d", "RouteConflict"),
    ]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("v1/x", "path 'v1/x' must start with '/'"),
        ("/v1/x?a=1", "path '/v1/x?a=1' cannot hold a query or fragment"),
        ("/v1//x", "path '/v1//x' has an empty segment"),
        ("/v1/{a}/{a}", "path '/v1/{a}/{a}' repeats the parameter {a}"),
        (
            "/v1/user-{id}",
            "path '/v1/user-{id}': segment 'user-{id}' must be a literal or a whole {name} "
            "parameter (letters, digits, underscore)",
        ),
        (
            "/v1/{1x}",
            "path '/v1/{1x}': segment '{1x}' must be a literal or a whole {name} "
            "parameter (letters, digits, underscore)",
        ),
        ("/v1/a b", "path '/v1/a b': segment 'a b' has invalid characters"),
    ],
)
def test_invalid_templates(template, message):
    with pytest.raises(InvalidTemplate) as caught:
        parse_template(template)
    assert str(caught.value) == message
    with pytest.raises(InvalidTemplate):
        Router.build([cmd("bad", "GET", template)])


def test_template_params():
    assert template_params("/v1/rooms/{room}/members/{member}") == ("room", "member")
    assert template_params("/") == ()
