"""Procedurally generated, exactly labelled scenes: the embedded default data source.

Each sample is a small room (floor, back wall, two side walls) holding 2-6 objects (boxes, cones,
cylinders, spheres) of varied colour, size and position, lit by a point light with Lambertian
shading and cast shadows, seen by a camera with random height, pitch, yaw and field of view.
Every pixel is ray-cast analytically with vectorised numpy, so depth, segmentation and normals
are exact and aligned with the rgb image, and a caption describes the visible objects.

Conventions:

* world: y up, the floor is ``y = 0``, the camera sits near ``x = z = 0`` looking towards ``+z``;
  image right is world ``+x`` when yaw is 0.
* depth: z-depth (distance along the optical axis) in metres; every pixel hits a surface.
* normals: camera frame, x right, y up, z towards the camera (a wall facing the camera is
  ``(0, 0, 1)``), unit length.
* a scene depends only on ``(seed, index)``; the resolution only changes how it is sampled.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

OBJECT_TYPES: tuple[str, ...] = ("box", "cone", "cylinder", "sphere")
BACKGROUND_CLASSES: tuple[str, ...] = ("floor", "wall")
SEMSEG_CLASSES: list[str] = [*BACKGROUND_CLASSES, *OBJECT_TYPES]
LABEL_CLASSES: list[str] = list(OBJECT_TYPES)
SAMPLE_KEYS: tuple[str, ...] = ("rgb", "depth", "semseg", "normals", "label", "caption")
# Spec changes a model needs for these scenes, e.g. ``modalities.resolve(names, SPEC_OVERRIDES)``.
SPEC_OVERRIDES: dict[str, dict] = {"semseg": {"num_classes": len(SEMSEG_CLASSES)}}

# Saturated object colours (linear albedo); walls and floor use muted tones so colour words are
# unambiguous in the image.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.80, 0.08, 0.07), "orange": (0.92, 0.42, 0.05), "yellow": (0.88, 0.80, 0.08),
    "green": (0.10, 0.62, 0.12), "cyan": (0.08, 0.68, 0.74), "blue": (0.08, 0.18, 0.85),
    "purple": (0.45, 0.12, 0.68), "pink": (0.95, 0.42, 0.62),
}
SIZE_WORDS: tuple[str, ...] = ("small", "medium", "large")
_FLOORS = ((0.50, 0.50, 0.50), (0.62, 0.55, 0.42), (0.50, 0.36, 0.25), (0.38, 0.42, 0.46))
_WALLS = ((0.80, 0.80, 0.78), (0.84, 0.79, 0.66), (0.70, 0.74, 0.79), (0.72, 0.77, 0.69))
_TEMPLATE_WORDS = ("a", "left", "of", "on", "the", "right", "in", "middle", "an", "empty", "room", ".")
_EPS = 1e-4
_AMBIENT = 0.28
_MIN_VISIBLE = 0.002  # an object is described when it covers at least this image fraction


def scene_vocabulary() -> list[str]:
    """Every word (and the period) a caption can contain, sorted; for training a tokenizer."""
    return sorted({*_TEMPLATE_WORDS, *COLORS, *SIZE_WORDS, *OBJECT_TYPES})


@dataclass(frozen=True)
class Camera:
    """Pinhole camera: position (3,), yaw and pitch in radians (pitch < 0 looks down), vertical fov."""

    pos: tuple[float, float, float]
    yaw: float
    pitch: float
    fov_y: float

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World-frame (forward, right, up) unit vectors, each (3,)."""
        cy, sy, cp, sp = math.cos(self.yaw), math.sin(self.yaw), math.cos(self.pitch), math.sin(self.pitch)
        fwd = np.array([sy * cp, sp, cy * cp])
        right = np.array([cy, 0.0, -sy])
        up = np.array([-sy * sp, cp, -cy * sp])
        return fwd, right, up


@dataclass(frozen=True)
class SceneObject:
    """One object resting on the floor at (x, z); ``size`` in metres is its characteristic half-size.

    ``dims`` are type-specific: box (half x, half y, half z), cone / cylinder (radius, height, 0),
    sphere (radius, 0, 0). ``yaw`` rotates boxes about the vertical axis.
    """

    type: str
    color: str
    albedo: tuple[float, float, float]
    size: float
    x: float
    z: float
    dims: tuple[float, float, float]
    yaw: float = 0.0

    @property
    def size_word(self) -> str:
        return SIZE_WORDS[0] if self.size < 0.33 else SIZE_WORDS[1] if self.size < 0.5 else SIZE_WORDS[2]

    @property
    def height(self) -> float:
        return {"box": 2 * self.dims[1], "sphere": 2 * self.dims[0]}.get(self.type, self.dims[1])

    @property
    def footprint(self) -> float:
        """Radius of a floor disc containing the object."""
        return math.hypot(self.dims[0], self.dims[2]) if self.type == "box" else self.dims[0]

    def bound(self) -> tuple[float, float, float, float]:
        """Bounding sphere (cx, cy, cz, radius)."""
        h = self.height
        return self.x, h / 2, self.z, math.hypot(self.footprint, h / 2)


@dataclass(frozen=True)
class Scene:
    """Everything needed to render: camera, point light (3,), room extents, materials, objects."""

    camera: Camera
    light: tuple[float, float, float]
    back_z: float
    half_width: float
    floor_albedo: tuple[float, float, float]
    wall_albedo: tuple[float, float, float]
    objects: tuple[SceneObject, ...]


def _jitter(rng: np.random.Generator, rgb: Sequence[float], amount: float) -> tuple[float, float, float]:
    d = rng.uniform(-amount, amount, 3)
    return tuple(min(max(float(c + e), 0.02), 0.98) for c, e in zip(rgb, d))  # type: ignore[return-value]


def _make_object(rng: np.random.Generator, kind: str, size: float) -> SceneObject:
    """An object of ``kind`` standing at the origin (placed later)."""
    x = z = 0.0
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    albedo = _jitter(rng, COLORS[color], 0.04)
    if kind == "box":
        dims = (size * rng.uniform(0.7, 1.2), size * rng.uniform(0.7, 1.2), size * rng.uniform(0.7, 1.2))
        return SceneObject(kind, color, albedo, size, x, z, dims, float(rng.uniform(0, math.pi / 2)))
    if kind == "sphere":
        return SceneObject(kind, color, albedo, size, x, z, (size, 0.0, 0.0))
    height = 2 * size * (rng.uniform(0.8, 1.6) if kind == "cylinder" else rng.uniform(1.1, 1.8))
    radius = size * rng.uniform(0.7, 1.0)
    return SceneObject(kind, color, albedo, size, x, z, (radius, height, 0.0))


def sample_scene(seed: int, index: int) -> Scene:
    """The scene of sample ``index`` of the stream ``seed``; deterministic, resolution-free."""
    rng = np.random.default_rng([int(seed), int(index), 0x5CE7E])
    cam = Camera(
        pos=(float(rng.uniform(-0.4, 0.4)), float(rng.uniform(1.2, 1.9)), 0.0),
        yaw=math.radians(rng.uniform(-10, 10)), pitch=math.radians(rng.uniform(-28, -12)),
        fov_y=math.radians(rng.uniform(50, 65)),
    )
    back_z, half_w = float(rng.uniform(8.0, 11.0)), float(rng.uniform(3.5, 5.0))
    light = (float(rng.uniform(-2.5, 2.5)), float(rng.uniform(3.0, 4.5)), float(rng.uniform(1.5, 6.0)))
    floor = _jitter(rng, _FLOORS[int(rng.integers(len(_FLOORS)))], 0.04)
    wall = _jitter(rng, _WALLS[int(rng.integers(len(_WALLS)))], 0.03)
    fwd, right, up = cam.axes()
    tan_y = math.tan(cam.fov_y / 2)
    objects: list[SceneObject] = []
    for _ in range(int(rng.integers(2, 7))):
        kind, size = OBJECT_TYPES[int(rng.integers(len(OBJECT_TYPES)))], float(rng.uniform(0.2, 0.7))
        obj = _make_object(rng, kind, size)
        r = obj.footprint
        for _attempt in range(40):
            # the floor contact point is drawn in image coordinates so objects land in view
            u, v = rng.uniform(-0.75, 0.75), rng.uniform(-0.85, 0.1)
            ray = fwd + u * tan_y * right + v * tan_y * up
            if ray[1] >= -1e-3:
                continue
            t = -cam.pos[1] / ray[1]
            x, z = float(cam.pos[0] + t * ray[0]), float(cam.pos[2] + t * ray[2])
            if z < 1.5 + r or z > back_z - r - 0.1 or abs(x) > half_w - r - 0.1:
                continue
            if any(math.hypot(x - o.x, z - o.z) < r + o.footprint + 0.1 for o in objects):
                continue
            objects.append(dataclasses.replace(obj, x=x, z=z))
            break
    return Scene(cam, light, back_z, half_w, floor, wall, tuple(objects))


# --- ray intersection: origins (ox, oy, oz) scalars or (N,), directions (N,) each; t in units of
# the (unnormalised) direction, np.inf where the ray misses or the hit is not in front of it.


def _hit_sphere(o: SceneObject, ox, oy, oz, dx, dy, dz) -> np.ndarray:
    r = o.dims[0]
    px, py, pz = ox - o.x, oy - r, oz - o.z
    a = dx * dx + dy * dy + dz * dz
    b = px * dx + py * dy + pz * dz
    c = px * px + py * py + pz * pz - r * r
    disc = b * b - a * c
    sq = np.sqrt(np.maximum(disc, 0))
    t = (-b - sq) / a
    t = np.where(t > _EPS, t, (-b + sq) / a)  # a ray starting inside leaves through the far side
    return np.where((disc >= 0) & (t > _EPS), t, np.inf)


def _to_local_xz(o: SceneObject, x, z):
    c, s = math.cos(o.yaw), math.sin(o.yaw)
    return c * x - s * z, s * x + c * z


def _hit_box(o: SceneObject, ox, oy, oz, dx, dy, dz) -> np.ndarray:
    lox, loz = _to_local_xz(o, ox - o.x, oz - o.z)
    ldx, ldz = _to_local_xz(o, dx, dz)
    near = np.full(np.shape(dx), -np.inf, dtype=np.float32)
    far = np.full(np.shape(dx), np.inf, dtype=np.float32)
    for orig, d, h in ((lox, ldx, o.dims[0]), (oy - o.dims[1], dy, o.dims[1]), (loz, ldz, o.dims[2])):
        inv = 1.0 / d
        t1, t2 = (-h - orig) * inv, (h - orig) * inv
        near = np.maximum(near, np.minimum(t1, t2))
        far = np.minimum(far, np.maximum(t1, t2))
    near = np.where(near > _EPS, near, far)  # a ray starting inside leaves through the far side
    return np.where((near <= far) & (near > _EPS), near, np.inf)


def _hit_cylinder(o: SceneObject, ox, oy, oz, dx, dy, dz) -> np.ndarray:
    r, h = o.dims[0], o.dims[1]
    px, pz = ox - o.x, oz - o.z
    a = dx * dx + dz * dz
    b = px * dx + pz * dz
    disc = b * b - a * (px * px + pz * pz - r * r)
    side = _side_hits(a, b, disc, oy, dy, h)
    tc = (h - oy) / dy
    cx, cz = px + tc * dx, pz + tc * dz
    cap = np.where((tc > _EPS) & (cx * cx + cz * cz <= r * r), tc, np.inf)
    return np.minimum(side, cap)


def _hit_cone(o: SceneObject, ox, oy, oz, dx, dy, dz) -> np.ndarray:
    r, h = o.dims[0], o.dims[1]
    k2 = (r / h) ** 2
    px, pz, y0 = ox - o.x, oz - o.z, h - oy
    a = dx * dx + dz * dz - k2 * dy * dy
    b = px * dx + pz * dz + k2 * y0 * dy
    c = px * px + pz * pz - k2 * y0 * y0
    return _side_hits(a, b, b * b - a * c, oy, dy, h)


def _side_hits(a, b, disc, oy, dy, h: float) -> np.ndarray:
    """The nearer root ``(-b -+ sqrt(disc)) / a`` in front of the ray whose height is in [0, h]."""
    sq = np.sqrt(np.maximum(disc, 0))
    best = np.full(np.shape(dy), np.inf, dtype=np.float32)
    for t in ((-b - sq) / a, (-b + sq) / a):
        y = oy + t * dy
        best = np.minimum(best, np.where((disc >= 0) & (t > _EPS) & (y >= 0) & (y <= h), t, np.inf))
    return best


_HIT: dict[str, Callable[..., np.ndarray]] = {
    "box": _hit_box, "cone": _hit_cone, "cylinder": _hit_cylinder, "sphere": _hit_sphere,
}


def _candidates(o: SceneObject, ox, oy, oz, dx, dy, dz) -> np.ndarray:
    """Indices (M,) of rays that meet the object's bounding sphere (a cheap pre-test)."""
    cx, cy, cz, rad = o.bound()
    px, py, pz = ox - cx, oy - cy, oz - cz
    b = px * dx + py * dy + pz * dz
    a = dx * dx + dy * dy + dz * dz
    disc = b * b - a * (px * px + py * py + pz * pz - rad * rad)
    return np.flatnonzero(disc >= 0)


def _take(v, idx: np.ndarray):
    return v[idx] if isinstance(v, np.ndarray) and v.ndim else v


def _intersect(o: SceneObject, ox, oy, oz, dx, dy, dz) -> np.ndarray:
    """Hit distance (N,) of every ray with one object, testing only rays near it."""
    t = np.full(dx.shape, np.inf, dtype=np.float32)
    idx = _candidates(o, ox, oy, oz, dx, dy, dz)
    if idx.size:
        args = [_take(v, idx) for v in (ox, oy, oz, dx, dy, dz)]
        t[idx] = _HIT[o.type](o, *args)
    return t


def _object_normals(o: SceneObject, px, py, pz) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World-frame unit normals (M,) x3 at surface points of ``o``."""
    qx, qz = px - o.x, pz - o.z
    if o.type == "sphere":
        r = o.dims[0]
        return qx / r, (py - r) / r, qz / r
    if o.type == "box":
        lx, lz = _to_local_xz(o, qx, qz)
        rel = np.stack([np.abs(lx) / o.dims[0], np.abs(py - o.dims[1]) / o.dims[1], np.abs(lz) / o.dims[2]])
        axis = rel.argmax(0)
        n = [np.where(axis == i, np.sign(v), 0.0).astype(np.float32) for i, v in enumerate((lx, py - o.dims[1], lz))]
        c, s = math.cos(o.yaw), math.sin(o.yaw)  # local -> world is the inverse rotation
        return c * n[0] + s * n[2], n[1], -s * n[0] + c * n[2]
    r, h = o.dims[0], o.dims[1]
    if o.type == "cylinder":
        top = py >= h - 1e-3
        rad = np.maximum(np.sqrt(qx * qx + qz * qz), 1e-6)
        return np.where(top, 0.0, qx / rad), np.where(top, 1.0, 0.0), np.where(top, 0.0, qz / rad)
    ny = (r / h) ** 2 * (h - py)  # cone: gradient of x^2 + z^2 - (r/h)^2 (h - y)^2, halved
    norm = np.maximum(np.sqrt(qx * qx + ny * ny + qz * qz), 1e-6)
    return qx / norm, ny / norm, qz / norm


@functools.lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre image-plane coordinates (H*W,) x2 in [-1, 1] (x right, y up)."""
    xs = ((np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1)
    ys = (1 - (np.arange(height, dtype=np.float32) + 0.5) / height * 2)
    gx, gy = np.meshgrid(xs, ys)
    gx.flags.writeable = False
    gy.flags.writeable = False
    return gx.ravel(), gy.ravel()


def _background(scene: Scene, ox: float, oy: float, oz: float, dx, dy, dz) -> tuple[np.ndarray, np.ndarray]:
    """Nearest room surface per ray: t (N,) and surface id (N,) (0 floor, 1 back, 2 left, 3 right wall)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ts = np.stack([
            np.where(dy < 0, -oy / dy, np.inf),
            np.where(dz > 0, (scene.back_z - oz) / dz, np.inf),
            np.where(dx < 0, (-scene.half_width - ox) / dx, np.inf),
            np.where(dx > 0, (scene.half_width - ox) / dx, np.inf),
        ]).astype(np.float32)
    sid = ts.argmin(0)
    return np.take_along_axis(ts, sid[None], 0)[0], sid


def render(scene: Scene, height: int, width: int | None = None) -> dict[str, np.ndarray]:
    """Ray-cast a scene.

    Returns numpy arrays: ``rgb`` uint8 (H,W,3), ``depth`` float32 (H,W) z-depth in metres,
    ``semseg`` int64 (H,W) indices into SEMSEG_CLASSES, ``instance`` int64 (H,W) object index or
    -1, ``normals`` float32 (H,W,3) camera frame.
    """
    width = width or height
    cam = scene.camera
    fwd, right, up = (v.astype(np.float32) for v in cam.axes())
    tan_y = math.tan(cam.fov_y / 2)
    gx, gy = _pixel_grid(height, width)
    gx, gy = gx * (tan_y * width / height), gy * tan_y
    # unnormalised directions with d . fwd == 1, so the hit distance t is the z-depth
    dx, dy, dz = (fwd[i] + gx * right[i] + gy * up[i] for i in range(3))
    ox, oy, oz = (float(v) for v in cam.pos)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        t, sid = _background(scene, ox, oy, oz, dx, dy, dz)
        for k, obj in enumerate(scene.objects):
            tk = _intersect(obj, ox, oy, oz, dx, dy, dz)
            closer = tk < t
            t = np.where(closer, tk, t)
            sid = np.where(closer, 4 + k, sid)
        px, py, pz = ox + t * dx, oy + t * dy, oz + t * dz
        nx, ny, nz, albedo = _surfaces(scene, sid, px, py, pz)
        shade = _shading(scene, px, py, pz, nx, ny, nz)
    rgb = np.sqrt(np.clip(albedo * shade[:, None], 0, 1)) * 255 + 0.5  # gamma 2
    cls = np.array([0, 1, 1, 1] + [2 + OBJECT_TYPES.index(o.type) for o in scene.objects])
    cam_n = np.stack([nx * right[0] + ny * right[1] + nz * right[2],
                      nx * up[0] + ny * up[1] + nz * up[2],
                      -(nx * fwd[0] + ny * fwd[1] + nz * fwd[2])], -1)
    return {
        "rgb": rgb.astype(np.uint8).reshape(height, width, 3),
        "depth": t.astype(np.float32).reshape(height, width),
        "semseg": cls[sid].reshape(height, width),
        "instance": (sid.astype(np.int64) - 4).clip(-1).reshape(height, width),
        "normals": cam_n.astype(np.float32).reshape(height, width, 3),
    }


def _surfaces(scene: Scene, sid: np.ndarray, px, py, pz):
    """World normals (N,) x3 and albedo (N,3) of the surface each ray hit."""
    n = sid.shape[0]
    nx, ny, nz = (np.zeros(n, np.float32) for _ in range(3))
    albedo = np.empty((n, 3), np.float32)
    floor = sid == 0
    ny[floor] = 1.0
    checker = ((np.floor(px[floor] * 2) + np.floor(pz[floor] * 2)) % 2) * 0.1 + 0.9
    albedo[floor] = np.asarray(scene.floor_albedo, np.float32) * checker[:, None]
    nz[sid == 1] = -1.0
    nx[sid == 2], nx[sid == 3] = 1.0, -1.0
    wall = (sid >= 1) & (sid <= 3)
    band = np.where(py[wall] < 0.12, 0.75, 1.0)  # a darker skirting board
    side = np.where(sid[wall] == 1, 1.0, 0.93)  # side walls a little darker than the back wall
    albedo[wall] = np.asarray(scene.wall_albedo, np.float32) * (side * band)[:, None]
    for k, obj in enumerate(scene.objects):
        m = np.flatnonzero(sid == 4 + k)
        if m.size:
            nx[m], ny[m], nz[m] = _object_normals(obj, px[m], py[m], pz[m])
            albedo[m] = obj.albedo
    return nx, ny, nz, albedo


def _shading(scene: Scene, px, py, pz, nx, ny, nz) -> np.ndarray:
    """Ambient + Lambertian light (N,), zero diffuse where another object blocks the light."""
    lx, ly, lz = (scene.light[i] - p for i, p in enumerate((px, py, pz)))
    inv = 1.0 / np.sqrt(lx * lx + ly * ly + lz * lz)
    lam = np.maximum((nx * lx + ny * ly + nz * lz) * inv, 0)
    lit = np.flatnonzero(lam > 0)
    if lit.size:
        off = 2e-3
        ox, oy, oz = px[lit] + off * nx[lit], py[lit] + off * ny[lit], pz[lit] + off * nz[lit]
        dx, dy, dz = lx[lit], ly[lit], lz[lit]  # t = 1 reaches the light
        blocked = np.zeros(lit.size, bool)
        for obj in scene.objects:
            blocked |= _intersect(obj, ox, oy, oz, dx, dy, dz) < 1.0
        lam[lit[blocked]] = 0.0
    return _AMBIENT + (1 - _AMBIENT) * lam


def project_x(scene: Scene, x: float, y: float, z: float) -> float:
    """Horizontal image coordinate in [-1, 1] (left to right) of a world point."""
    cam = scene.camera
    fwd, right, _ = cam.axes()
    rel = np.array([x, y, z]) - np.asarray(cam.pos)
    return float(rel @ right / max(rel @ fwd, 1e-6) / math.tan(cam.fov_y / 2))


def describe(scene: Scene, instance: np.ndarray) -> tuple[str, int]:
    """Caption and image-level label (type of the largest visible object) of a rendered scene.

    ``instance`` (H,W) is the object-index map from :func:`render`; objects covering less than
    0.2% of the image are not mentioned. Objects are described from left to right in pairs
    ("a large red sphere left of a small blue box.") and an odd one by its position.
    """
    counts = np.bincount(instance.ravel() + 1, minlength=len(scene.objects) + 1)[1:]
    visible = [k for k in range(len(scene.objects)) if counts[k] >= _MIN_VISIBLE * instance.size]
    label = OBJECT_TYPES.index(scene.objects[int(counts.argmax())].type) if len(scene.objects) else 0
    if not visible:
        return "an empty room.", label
    xs = {k: project_x(scene, scene.objects[k].x, scene.objects[k].height / 2, scene.objects[k].z) for k in visible}
    order = sorted(visible, key=lambda k: xs[k])
    words = {k: f"a {o.size_word} {o.color} {o.type}" for k, o in enumerate(scene.objects)}
    sentences = [f"{words[a]} left of {words[b]}." for a, b in zip(order[0::2], order[1::2])]
    if len(order) % 2:
        last = order[-1]
        where = "on the left" if xs[last] < -1 / 3 else "on the right" if xs[last] > 1 / 3 else "in the middle"
        sentences.append(f"{words[last]} {where}.")
    return " ".join(sentences), label


# Image-level attributes a caption states, for probing frozen features beyond the scene label:
# name -> class names (the attribute's value indexes them). "type" is the scene's ``label``.
ATTRIBUTE_CLASSES: dict[str, list[str]] = {
    "type": list(LABEL_CLASSES),  # type of the largest visible object (the scene's label)
    "colour": list(COLORS),  # colour word of that object
    "count": [str(k) for k in range(7)],  # how many objects the caption describes (0-6)
    # where that object is in the image, in the thirds the caption's "on the left / in the middle /
    # on the right" uses (the caption orders its objects from left to right)
    "position": ["left", "middle", "right"],
}


def scene_attributes(seed: int, index: int, height: int, width: int | None = None) -> dict[str, int]:
    """The :data:`ATTRIBUTE_CLASSES` attributes of sample ``index`` of stream ``seed`` rendered at
    ``height`` x ``width`` (visibility, hence the largest object and the count, depends on the
    resolution as in :func:`generate`): indices into each attribute's class list."""
    scene = sample_scene(seed, index)
    instance = render(scene, height, width)["instance"]
    counts = np.bincount(instance.ravel() + 1, minlength=len(scene.objects) + 1)[1:]
    visible = int(sum(1 for c in counts if c >= _MIN_VISIBLE * instance.size))
    if not scene.objects:
        return {"type": 0, "colour": 0, "count": 0, "position": 1}
    largest = scene.objects[int(counts.argmax())]
    x = project_x(scene, largest.x, largest.height / 2, largest.z)
    return {"type": OBJECT_TYPES.index(largest.type), "colour": list(COLORS).index(largest.color), "count": visible,
            "position": 0 if x < -1 / 3 else 2 if x > 1 / 3 else 1}


def generate(seed: int, index: int, height: int, width: int | None = None) -> dict:
    """One raw sample (all of SAMPLE_KEYS plus ``__key__``) as torch tensors, see the data contract."""
    scene = sample_scene(seed, index)
    out = render(scene, height, width)
    caption, label = describe(scene, out["instance"])
    return {
        "rgb": torch.from_numpy(np.ascontiguousarray(out["rgb"].transpose(2, 0, 1))),
        "depth": torch.from_numpy(out["depth"])[None],
        "semseg": torch.from_numpy(out["semseg"]),
        "normals": torch.from_numpy(np.ascontiguousarray(out["normals"].transpose(2, 0, 1))),
        "label": torch.tensor(label, dtype=torch.int64),
        "caption": caption,
        "__key__": f"{index:08d}",
    }


# Extra bands of the scenes as a multi-band raster (``multimae data synthetic --bands``): what a
# multispectral camera would record, in uint16 reflectance x 10^4 (thermal: centi-kelvin), 0 = nodata.
MULTISPECTRAL_BANDS: tuple[str, ...] = ("blue", "green", "red", "nir", "thermal")
MULTISPECTRAL_NODATA = 0


def multispectral(seed: int, index: int, height: int, width: int | None = None) -> tuple[np.ndarray, int]:
    """Sample ``index`` of stream ``seed`` as a (5, H, W) uint16 raster of MULTISPECTRAL_BANDS, and
    its label. Visible bands are the linear reflectance the rgb image shows (x 10^4); near-infrared
    is bright on the floor and on green / yellow objects ("vegetation"), dark on walls; thermal is
    warmer where lit and near the camera. A third of the scenes (by ``(seed, index)``) miss a
    corner of the swath: those pixels hold the nodata value 0 in every band."""
    scene = sample_scene(seed, index)
    out = render(scene, height, width)
    _, label = describe(scene, out["instance"])
    h, w = out["depth"].shape
    lin = (out["rgb"].astype(np.float64) / 255.0) ** 2  # the gamma-2 image back to linear albedo x shade
    r, g, b = lin[..., 0], lin[..., 1], lin[..., 2]
    shade = lin.max(-1)
    sem = out["semseg"]
    veg = np.clip(1.6 * g - 0.9 * r - 0.4 * b, 0.0, 1.0)  # green-dominant surfaces
    nir = np.where(sem == 0, 0.55 * shade + 0.1, np.where(sem == 1, 0.25 * shade, 0.3 * shade + 0.7 * veg))
    depth = out["depth"].astype(np.float64)
    thermal = 29315.0 + 800.0 * shade - 60.0 * np.clip(depth, 0.0, 20.0)  # centi-kelvin
    bands = np.stack([b, g, r, np.clip(nir, 0.0, 1.0)]) * 10000.0
    arr = np.concatenate([bands, thermal[None]]).round().clip(1, 65535).astype(np.uint16)
    rng = np.random.default_rng([seed, index, 1789])
    if rng.random() < 1 / 3:  # a corner outside the swath
        yy, xx = np.mgrid[0:h, 0:w]
        cut = rng.uniform(0.25, 0.5) * (h + w)
        corner = int(rng.integers(4))
        ys, xs = (yy if corner < 2 else h - 1 - yy), (xx if corner % 2 == 0 else w - 1 - xx)
        arr[:, ys + xs < cut] = MULTISPECTRAL_NODATA
    return arr, label


class SyntheticScenes(Dataset):
    """A map-style dataset of procedurally generated scenes, rendered on the fly.

    ``ds[i]`` depends only on ``(seed, i)`` (not on the worker or process) and holds ``rgb`` uint8
    (3,S,S), ``depth`` float32 (1,S,S) metres, ``semseg`` int64 (S,S) (SEMSEG_CLASSES),
    ``normals`` float32 (3,S,S), ``label`` int64 () (LABEL_CLASSES), ``caption`` str and
    ``__key__``; ``modalities`` keeps a subset (names of sample keys or of registered modalities,
    whose batch key is used, e.g. ``norm_rgb`` -> ``rgb``). ``transform`` is applied last.
    """

    def __init__(self, num_samples: int, image_size: int = 224, seed: int = 0,
                 modalities: Sequence[str] | None = None, transform: Callable[[dict], dict] | None = None) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples, self.seed, self.transform = num_samples, seed, transform
        self.height, self.width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.keys = _sample_keys(modalities)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        sample = generate(self.seed, index, self.height, self.width)
        sample = {k: v for k, v in sample.items() if k in self.keys or k == "__key__"}
        return self.transform(sample) if self.transform is not None else sample


def _sample_keys(modalities: Sequence[object] | None) -> set[str]:
    if modalities is None:
        return set(SAMPLE_KEYS)
    from multimae.core import modalities as reg

    keys: set[str] = set()
    for m in modalities:
        name = m if isinstance(m, str) else getattr(m, "name", None)
        key = m.key if isinstance(m, reg.ModalitySpec) else name if name in SAMPLE_KEYS else reg.get(str(name)).key
        if key not in SAMPLE_KEYS:
            raise ValueError(f"synthetic scenes have no modality {key!r}; available: {list(SAMPLE_KEYS)}")
        keys.add(key)
    return keys


def write_multispectral(root: str, split: str, key: str, indices: Sequence[int], image_size: int, seed: int) -> int:
    """Write :func:`multispectral` of the scenes ``indices`` as ``root/split/key/<class>/<index>.tif``
    (the folder layout of ``multimae data synthetic``, band names and nodata in GDAL's tags)."""
    import os

    from multimae.data.rasters import write_raster

    for i in indices:
        arr, label = multispectral(seed, i, image_size)
        write_raster(os.path.join(root, split, key, LABEL_CLASSES[label], f"{i:08d}.tif"), arr,
                     MULTISPECTRAL_BANDS, nodata=MULTISPECTRAL_NODATA)
    return len(indices)
