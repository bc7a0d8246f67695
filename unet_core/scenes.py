"""Synthetic driving-camera scenes: the product's embedded default dataset.

Frames are drawn back to front; every layer writes its colour into the image and its class id into
the mask through the same pixel region, so the mask is always the class of the visible pixel.
One pinhole camera above a flat road projects a point `lateral` metres right, `depth` metres ahead
and `height` metres up to column vanishing_x + focal * lateral / depth and row
horizon + focal * (camera_height - height) / depth, so objects, lane lines and paving shrink alike.
"""

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from unet_core.classes import CLASS_IDS, N_CLASSES
from unet_core.data import IMAGE_DIR, MASK_DIR, decode_mask

LANE_WIDTH = 3.4  # metres; every size below is in metres too
FAR_DEPTH = 150.0  # street furniture beyond this is sub-pixel anyway
FACADE_HEIGHTS = {"building": (5, 30), "wall": (0.8, 3), "fence": (1, 2.2), "vegetation": (0.8, 2.5)}
SIGN_COLOURS = np.array(((200, 30, 30), (30, 70, 180), (230, 200, 40), (230, 230, 230)), np.float32)


def _span(low, high, limit):
    """Pixel slice for [low, high), at least one pixel wide so that thin far objects stay visible."""
    start = math.floor(low + 0.5)
    stop = max(math.floor(high + 0.5), start + 1)
    start, stop = max(start, 0), min(stop, limit)
    return slice(start, stop) if start < stop else None


def _smooth_field(rng, knots, height, width):
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled to the frame."""
    coarse = rng.random(knots, dtype=np.float32)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).clip(0, 1)


class _Scene:
    def __init__(self, rng, height, width):
        self.rng, self.height, self.width = rng, height, width
        self.rgb = np.empty((height, width, 3), np.float32)
        self.mask = np.full((height, width), CLASS_IDS["sky"], np.uint8)
        self.horizon = int(height * rng.uniform(0.33, 0.55))
        self.vanishing_x = width * rng.uniform(0.3, 0.7)
        self.focal = width * rng.uniform(0.6, 0.95)
        self.camera_height = rng.uniform(1.3, 2.4)
        self.lanes = int(rng.integers(2, 5))
        self.road_left = -rng.uniform(0.2, 0.8) * self.lanes * LANE_WIDTH
        self.road_right = self.road_left + self.lanes * LANE_WIDTH
        self.sidewalk_widths = rng.uniform(1.5, 5.0, size=2)  # left, right
        self.verge_widths = rng.uniform(0.5, 5.0, size=2) * (rng.random(2) < 0.5)  # grass strips
        self.visibility = rng.uniform(100, 700)
        if rng.random() < 0.3:  # overcast: a grey sky as dark as some roads and walls
            self.zenith = np.float32(rng.uniform(140, 210) + rng.uniform(-8, 8, 3))
            self.haze, self.cloud_cover = (self.zenith + 20).clip(0, 255), rng.uniform(0, 0.3)
        else:
            self.zenith = np.float32(rng.uniform(160, 235) * rng.uniform((0.2, 0.5, 1), (0.5, 0.8, 1)))
            self.haze = np.float32(rng.uniform((165, 185, 205), (225, 235, 250)))
            self.cloud_cover = rng.uniform(0, 0.6)

    # --- colours, projection and painting ------------------------------------------------------
    def _colour(self, low, high):
        """Scalar bounds give a grey (one value for every channel), per-channel bounds a hue."""
        return np.float32(self.rng.uniform(low, high))

    def _foliage(self):
        return np.float32(self.rng.uniform(50, 150) * self.rng.uniform((0.35, 1, 0.15), (0.9, 1, 0.6)))

    def _fogged(self, colour, depth):
        """Aerial perspective: far things fade into the haze colour, and so look alike."""
        weight = np.float32(1.0) - np.exp(-depth / np.float32(self.visibility))
        return colour * (1.0 - weight) + self.haze * weight

    def _box(self, left, right, low, high, depth):
        scale = self.focal / depth
        rows = _span(self.horizon + (self.camera_height - high) * scale,
                     self.horizon + (self.camera_height - low) * scale, self.height)
        cols = _span(self.vanishing_x + left * scale, self.vanishing_x + right * scale, self.width)
        return None if rows is None or cols is None else (rows, cols)

    def _paint(self, box, colour, class_name, where=None):
        if box is None:
            return
        if where is None:
            self.rgb[box] = colour
            self.mask[box] = CLASS_IDS[class_name]
        else:
            np.copyto(self.rgb[box], colour, where=where[..., None])
            self.mask[box][where] = CLASS_IDS[class_name]

    def _rect(self, left, right, low, high, depth, colour, class_name):
        """An upright rectangle facing the camera, e.g. a car's back or a pedestrian's torso."""
        self._paint(self._box(left, right, low, high, depth), self._fogged(colour, depth), class_name)

    def _ellipse(self, lateral, height, radius_x, radius_y, depth, colour, class_name, bumps=0.0):
        reach = 1.0 + bumps
        box = self._box(lateral - radius_x * reach, lateral + radius_x * reach,
                        height - radius_y * reach, height + radius_y * reach, depth)
        if box is None:
            return
        scale = self.focal / depth
        rows = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None] + 0.5
        cols = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :] + 0.5
        up = (height - self.camera_height + (rows - self.horizon) / scale) / -radius_y
        across = ((cols - self.vanishing_x) / scale - lateral) / radius_x
        radius = 1.0
        if bumps:  # a few random harmonics make a tree crown's outline irregular
            angle = np.arctan2(up, across)
            for harmonic in (3, 5, 8):
                radius = radius + bumps / 2 * np.cos(harmonic * angle + self.rng.uniform(0, 2 * np.pi))
        shaded = self._fogged(colour, depth) * (1.0 + 0.25 * up[..., None])  # lit from above
        self._paint(box, shaded, class_name, where=across * across + up * up <= radius * radius)

    # --- layers, back to front ----------------------------------------------------------------
    def draw_sky_and_skyline(self):
        rng, horizon, width = self.rng, self.horizon, self.width
        altitude = (1.0 - np.arange(horizon, dtype=np.float32) / horizon)[:, None, None] ** 0.6
        sky = self.haze + (self.zenith - self.haze) * altitude
        clouds = np.clip((_smooth_field(rng, (4, 9), horizon, width) - 1 + self.cloud_cover) * 3, 0, 1)
        self.rgb[:horizon] = sky
        self.rgb[:horizon] += (self._colour(215, 250) - sky) * clouds[..., None]
        cols = np.arange(width)
        if rng.random() < 0.6:  # distant city: flat blocks, nearly the haze colour
            edges = np.cumsum(rng.integers(8, 60, size=width // 8 + 1))
            heights = rng.uniform(2, 0.35 * horizon, size=edges.size)
            self._skyline(horizon - heights[np.searchsorted(edges, cols, side="right")],
                          self._fogged(self._colour(60, 200), rng.uniform(300, 800)), "building")
        if rng.random() < 0.8:  # distant tree line: a bumpy random profile
            knots = width // 12 + 2
            profile = np.interp(cols, np.linspace(0, width, knots), rng.random(knots)) ** 0.5
            tops = horizon - profile * rng.uniform(4, 0.25 * horizon) - rng.uniform(0, 3, width)
            self._skyline(tops, self._fogged(self._foliage(), rng.uniform(150, 500)), "vegetation")

    def _skyline(self, tops, colour, class_name):
        first = max(int(tops.min()), 0)
        rows = np.arange(first, self.horizon, dtype=np.float32)[:, None]
        self._paint((slice(first, self.horizon), slice(0, self.width)), colour, class_name, where=rows >= tops)

    def draw_ground(self):
        rng, horizon, ids = self.rng, self.horizon, CLASS_IDS
        rows_below = np.arange(self.height - horizon, dtype=np.float32)[:, None] + 0.5
        depth = self.focal * self.camera_height / rows_below
        lateral = (np.arange(self.width, dtype=np.float32) + 0.5 - self.vanishing_x) * (depth / self.focal)
        on_sidewalk = (lateral >= self.road_left - self.sidewalk_widths[0]) & (
            lateral <= self.road_right + self.sidewalk_widths[1])
        on_road = (lateral >= self.road_left) & (lateral <= self.road_right)
        classes = np.full(lateral.shape, ids["terrain"], np.uint8)
        classes[on_sidewalk] = ids["sidewalk"]
        classes[on_road] = ids["road"]
        classes[self._lane_lines(lateral, depth, on_road)] = ids["road_line"]

        colours = np.zeros((N_CLASSES, 3), np.float32)
        colours[ids["road"]] = rng.uniform(50, 135) + rng.uniform(-8, 8, 3)
        colours[ids["sidewalk"]] = (rng.uniform(100, 200) + rng.uniform(-10, 10, 3) if rng.random() < 0.7
                                    else rng.uniform((130, 70, 60), (190, 120, 100)))
        colours[ids["terrain"]] = (rng.uniform((70, 100, 40), (120, 150, 80)) if rng.random() < 0.6
                                   else rng.uniform((110, 90, 60), (170, 150, 110)))
        colours[ids["road_line"]] = (rng.uniform((200, 200, 190), (245, 245, 240)) if rng.random() < 0.8
                                     else rng.uniform((200, 160, 20), (240, 200, 70)))
        rgb = colours[classes]
        paver = rng.uniform(0.3, 1.2)  # paving-stone joints, in metres so they follow the perspective
        rgb[on_sidewalk & ~on_road & (((lateral % paver) < 0.05) | ((depth % paver) < 0.05))] *= 0.8
        fog = (1.0 - np.exp(-depth / np.float32(self.visibility)))[..., None]
        rgb *= 1.0 - fog
        rgb += self.haze * fog
        self.rgb[horizon:] = rgb
        self.mask[horizon:] = classes

    def _lane_lines(self, lateral, depth, on_road):
        rng = self.rng
        half_width, period = rng.uniform(0.05, 0.1), rng.uniform(6, 14)
        dashed = ((depth + rng.uniform(0, period)) % period) < rng.uniform(0.3, 0.6) * period
        lines = np.zeros(lateral.shape, bool)
        for lane in range(1, self.lanes):
            on_line = np.abs(lateral - (self.road_left + lane * LANE_WIDTH)) < half_width
            lines |= on_line & dashed if rng.random() < 0.75 else on_line
        if rng.random() < 0.6:
            for edge in (self.road_left + 0.3, self.road_right - 0.3):
                lines |= np.abs(lateral - edge) < half_width
        if rng.random() < 0.25:  # zebra crossing
            near = rng.uniform(6, 40)
            lines |= on_road & (depth > near) & (depth < near + 4) & ((lateral % 1.0) < 0.5)
        return lines

    def draw_street_side(self, side):
        """Buildings, walls, fences and hedges along one side (-1 left, +1 right), far to near."""
        rng = self.rng
        if rng.random() < 0.2:  # open land: the skyline stays visible
            return
        index = 0 if side < 0 else 1
        kerb = self.road_left if side < 0 else self.road_right
        front = kerb + side * (self.sidewalk_widths[index] + self.verge_widths[index])
        segments, depth = [], rng.uniform(1, 10)
        while depth < FAR_DEPTH:
            length = rng.uniform(6, 40)
            kind = str(rng.choice(("building", "building", "building", "wall", "fence", "vegetation", "gap")))
            if kind != "gap":
                segments.append((kind, front + side * rng.uniform(0, 2), depth, depth + length))
            depth += length
        for kind, plane, near, far in reversed(segments):
            self._facade(kind, plane, near, far, side)

    def _facade(self, kind, plane, near, far, side):
        """A wall parallel to the road at lateral `plane`, from depth `near` to `far`."""
        rng = self.rng
        top = rng.uniform(*FACADE_HEIGHTS[kind])
        if kind == "vegetation":
            colour = self._foliage()
        else:  # greys overlapping the road's, or tinted plaster and brick
            tint = self._colour((0.9, 0.7, 0.5), (1.1, 1, 0.9)) if rng.random() < 0.5 else 1.0
            colour = self._colour(60, 200) * tint
        if kind == "building":  # the end wall facing the camera, in shadow
            end = plane + side * rng.uniform(8, 20)
            self._rect(min(plane, end), max(plane, end), 0, top, near, colour * 0.7, kind)
        near_x, far_x = (self.vanishing_x + self.focal * plane / depth for depth in (near, far))
        cols = _span(min(near_x, far_x), max(near_x, far_x), self.width)
        if cols is None:
            return
        col_centres = np.arange(cols.start, cols.stop, dtype=np.float32)[None, :] + 0.5
        depth = np.clip(self.focal * plane / (col_centres - self.vanishing_x), near, far)
        bottoms = self.horizon + self.focal * self.camera_height / depth
        tops = self.horizon + self.focal * (self.camera_height - top) / depth
        rows = slice(max(int(tops.min()), 0), min(math.ceil(bottoms.max()), self.height))
        if rows.start >= rows.stop:
            return
        row_centres = np.arange(rows.start, rows.stop, dtype=np.float32)[:, None] + 0.5
        region = (row_centres >= tops) & (row_centres < bottoms)
        height = self.camera_height - (row_centres - self.horizon) * depth / self.focal
        pixels = np.broadcast_to(colour, region.shape + (3,))
        if kind == "building":  # window grid: bays along the street, one row per storey
            bay, storey = rng.uniform(2, 5), rng.uniform(2.8, 3.6)
            in_storey = height % storey
            windows = ((depth % bay) < rng.uniform(0.4, 0.7) * bay) & (in_storey > rng.uniform(0.6, 1.0))
            windows &= (in_storey < storey - 0.5) & (height > rng.uniform(0.5, 3.5)) & (height < top - 0.8)
            glass = self._colour(20, 130) * self._colour((0.7, 0.85, 1), (0.9, 1, 1))
            pixels = np.where(windows[..., None], glass, pixels)
        elif kind == "fence":  # see-through: only the posts and two rails are fence
            spacing = rng.uniform(0.15, 2.0)
            rails = (np.abs(height - top + 0.1) < 0.08) | (np.abs(height - 0.3) < 0.08)
            region &= ((depth % spacing) < 0.3 * spacing) | rails
        self._paint((rows, cols), self._fogged(pixels, depth[..., None]), kind, where=region)

    def draw_objects(self):
        """Poles, trees, pedestrians and vehicles, drawn from the farthest to the nearest."""
        rng, objects = self.rng, []
        nearest = self.focal * self.camera_height / (self.height - self.horizon)  # depth at the bottom row
        for index, side in enumerate((-1, 1)):
            kerb, sidewalk = (self.road_left if side < 0 else self.road_right), self.sidewalk_widths[index]
            for depth in np.cumsum(rng.uniform(10, 35, size=6)) - rng.uniform(5, 8):  # first one 2-30 m ahead
                objects.append((depth, self._pole, kerb + side * rng.uniform(0.3, 0.6), side))
            if self.verge_widths[index] > 0 or rng.random() < 0.3:
                for depth in np.cumsum(rng.uniform(5, 20, size=12)):
                    verge = sidewalk + self.verge_widths[index] * rng.uniform(0.3, 0.7)
                    objects.append((depth, self._tree, kerb + side * verge, side))
            for _ in range(rng.integers(0, 5)):
                lateral = kerb + side * rng.uniform(0.4, sidewalk - 0.3)
                objects.append((rng.uniform(nearest + 1, 50), self._pedestrian, lateral, side))
        if rng.random() < 0.2:  # someone crossing the road
            lateral = rng.uniform(self.road_left, self.road_right)
            objects.append((rng.uniform(nearest + 3, 30), self._pedestrian, lateral, 1))
        for _ in range(rng.integers(1, 7)):
            lateral = self.road_left + (rng.integers(self.lanes) + 0.5) * LANE_WIDTH + rng.uniform(-0.4, 0.4)
            objects.append((rng.uniform(nearest + 4, 70), self._vehicle, lateral, 1))
        for depth, draw, lateral, side in sorted(objects, key=lambda item: -item[0]):
            draw(lateral, depth, side)

    def _pole(self, lateral, depth, side):
        rng = self.rng
        half_width, top = rng.uniform(0.06, 0.13), rng.uniform(3.5, 8)
        colour = self._colour(40, 170) * self._colour((0.85,) * 3, (1.1,) * 3)
        self._rect(lateral - half_width, lateral + half_width, 0, top, depth, colour, "pole")
        if rng.random() < 0.4:  # street lamp arm reaching over the road
            tip = lateral - side * rng.uniform(1, 3)
            self._rect(min(lateral, tip), max(lateral, tip), top - 0.15, top, depth, colour, "pole")
        if rng.random() < 0.5:
            size, centre, front = rng.uniform(0.25, 0.45), rng.uniform(2.2, 3.5), lateral - side * 0.1
            colour = SIGN_COLOURS[rng.integers(len(SIGN_COLOURS))] * self._colour(0.75, 1.1)
            if rng.random() < 0.5:
                self._ellipse(front, centre, size, size, depth, colour, "traffic_sign")
            else:
                self._rect(front - size, front + size, centre - size, centre + size, depth, colour,
                           "traffic_sign")

    def _tree(self, lateral, depth, side):
        rng = self.rng
        trunk_top, radius = rng.uniform(1.5, 4), rng.uniform(1.2, 3.5)
        bark = self._colour((50, 35, 20), (110, 90, 60))
        self._rect(lateral - 0.15, lateral + 0.15, 0, trunk_top + radius * 0.5, depth, bark, "vegetation")
        self._ellipse(lateral, trunk_top + radius * 0.8, radius, radius * rng.uniform(0.9, 1.4), depth,
                      self._foliage(), "vegetation", bumps=rng.uniform(0.05, 0.2))

    def _pedestrian(self, lateral, depth, side):
        rng = self.rng
        size = rng.uniform(1.5, 1.95)
        scale, stride = size / 1.75, rng.uniform(0, 0.15)
        shirt, trousers = self._colour((10,) * 3, (230,) * 3), self._colour((10,) * 3, (160,) * 3)
        skin = self._colour((60, 40, 30), (230, 190, 160))
        for left, right, low, high, colour in (
            (-0.15 * scale - stride, -0.01 * scale, 0, 0.48, trousers),  # legs
            (0.01 * scale, 0.15 * scale + stride, 0, 0.48, trousers),
            (-0.27 * scale, 0.27 * scale, 0.5, 0.8, shirt * 0.85),  # arms behind the torso
            (-0.2 * scale, 0.2 * scale, 0.46, 0.83, shirt),
        ):
            self._rect(lateral + left, lateral + right, low * size, high * size, depth, colour, "pedestrian")
        self._ellipse(lateral, 0.91 * size, 0.1 * scale, 0.12 * scale, depth, skin, "pedestrian")

    def _vehicle(self, lateral, depth, side):
        rng = self.rng
        truck = rng.random() < 0.2
        half_width = rng.uniform(1.15, 1.3) if truck else rng.uniform(0.82, 1.0)
        body_top = rng.uniform(2.6, 3.6) if truck else rng.uniform(0.85, 1.05)
        left, right = lateral - half_width, lateral + half_width
        paint = self._colour(15, 235) * self._colour((0.5,) * 3, (1.0,) * 3)
        tyre, light = self._colour(10, 40), self._colour((150, 0, 0), (250, 60, 40))
        shadow = self._box(left + 0.3, right - 0.3, 0, 0.3, depth)
        if shadow is not None:  # the road under the car stays road, only darker
            self.rgb[shadow] *= 0.35
        parts = [(left + 0.05, left + 0.4, 0, 0.65, tyre), (right - 0.4, right - 0.05, 0, 0.65, tyre),
                 (left, right, 0.28, body_top, paint)]
        if not truck:
            inset, roof = half_width * 0.2, body_top + rng.uniform(0.4, 0.6)
            glass = self._colour(20, 90)
            parts += [(left + inset, right - inset, body_top - 0.05, roof, paint * 0.9),
                      (left + inset + 0.1, right - inset - 0.1, body_top + 0.02, roof - 0.08, glass)]
        parts += [(left + 0.05, left + 0.3, body_top - 0.3, body_top - 0.12, light),
                  (right - 0.3, right - 0.05, body_top - 0.3, body_top - 0.12, light),
                  (lateral - 0.25, lateral + 0.25, 0.4, 0.52, self._colour(180, 240))]  # number plate
        for part_left, part_right, low, high, colour in parts:
            self._rect(part_left, part_right, low, high, depth, colour, "vehicle")

    def finish(self):
        """Uneven light, exposure, white balance and sensor noise over the whole frame."""
        rng = self.rng
        gain = (_smooth_field(rng, (3, 4), self.height, self.width) - 0.5) * rng.uniform(0.05, 0.4) + 1.0
        self.rgb *= gain[..., None] * rng.uniform(0.55, 1.25)
        self.rgb *= self._colour((0.92,) * 3, (1.08,) * 3)
        amplitude = int(rng.integers(3, 15))
        self.rgb += rng.integers(-amplitude, amplitude + 1, (self.height, self.width, 1), dtype=np.int8)
        np.clip(self.rgb, 0, 255, out=self.rgb)
        return self.rgb.astype(np.uint8), self.mask


def render_scene(rng: np.random.Generator, height=480, width=640) -> tuple[np.ndarray, np.ndarray]:
    """One random street scene: (RGB uint8 height×width×3, class ids uint8 height×width)."""
    scene = _Scene(rng, height, width)
    scene.draw_sky_and_skyline()
    scene.draw_ground()
    scene.draw_street_side(-1)
    scene.draw_street_side(1)
    scene.draw_objects()
    return scene.finish()


def _save_atomically(pixels, path):
    """Write under a hidden temporary name first, so that no reader ever sees a truncated PNG."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(pixels).save(temporary, format="PNG", compress_level=1)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _holds_mask(path, class_ids):
    """Whether the mask at `path` holds `class_ids`, read as training reads it."""
    try:
        return np.array_equal(decode_mask(path.read_bytes(), str(path)), class_ids)
    except (OSError, ValueError):  # none there, or not a mask
        return False


def scene_name(index):
    return f"scene_{index:06d}.png"


def write_scenes(output_dir, count, seed=0, start=0) -> list[str]:
    """Render frames start .. start+count-1 in CARLA's layout (CameraRGB/, CameraMask/ RGBA PNGs).

    Frame i depends only on (seed, i), so reruns and parallel workers write identical files.
    Returns the file names, e.g. "scene_000000.png".
    """
    image_dir, mask_dir = Path(output_dir) / IMAGE_DIR, Path(output_dir) / MASK_DIR
    for folder in (image_dir, mask_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file on the way, a read-only place: a bad output, not a crash
            raise ValueError(f"{output_dir}: cannot hold {folder.name}/ ({error.strerror or error})") from None
    names = []
    for index in range(start, start + count):
        rgb, class_ids = render_scene(np.random.default_rng([seed, index]))
        opaque, blank = np.full(class_ids.shape, 255, np.uint8), np.zeros_like(class_ids)
        name = scene_name(index)
        _save_atomically(np.dstack([rgb, opaque]), image_dir / name)
        try:
            _save_atomically(np.dstack([class_ids, blank, blank, opaque]), mask_dir / name)
        except BaseException:  # Ctrl-C among them: never an image without its mask, which training refuses,
            # nor beside the mask of an earlier run's other frame i (another --seed): wrong labels, unseen. That
            # mask is left unpaired, which training names.
            if not _holds_mask(mask_dir / name, class_ids):
                (image_dir / name).unlink(missing_ok=True)
            raise
        names.append(name)
    return names
